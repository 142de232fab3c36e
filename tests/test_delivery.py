"""The delivery ledger on its own: the first delivery of a batch id decides, repeats are discarded."""

import pytest

from ar2dlm_ray.cluster.delivery import DeliveryLedger


def test_first_delivery_decides_and_repeats_are_discarded():
    ledger = DeliveryLedger()
    assert ledger.claim(0, "trained") and ledger.claim(1, "dropped") and ledger.claim(2, "trained")
    assert not ledger.claim(0, "trained")  # the copy of a batch whose producer died after delivering
    assert not ledger.claim(1, "trained")  # a dropped batch is not trained later either
    assert not ledger.claim(0, "dropped")
    s = ledger.summary()
    assert s["trained_ids"] == [0, 2] and s["dropped_ids"] == [1] and s["discarded_ids"] == [0, 1]
    assert s["discarded_duplicates"] == 3
    assert s["consumed"] == 6 == s["trained"] + s["dropped"] + s["discarded_duplicates"]


def test_unknown_outcome_is_refused():
    with pytest.raises(ValueError, match="outcome"):
        DeliveryLedger().claim(0, "lost")
