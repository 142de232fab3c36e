"""The Ray actor/learner system: actors (thin shells around the core modules), weight publication,
metrics and the driver. Only imported in mode=ray, so the core package works without a Ray cluster."""
