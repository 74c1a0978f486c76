"""The Feast feature repository of htcl (definitions.py, feature_store.yaml) and store.py, which opens it."""
