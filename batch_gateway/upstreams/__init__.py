"""The model servers batches run on: where each model's requests go (`routes.py`), `k8s://` Services resolved to their
pods (`discovery.py`), and what the servers serve, asked (`catalog.py`). Shared by the API, which refuses an endpoint
no server answers, and the runner, which validates models and dispatches."""
