"""Pipelines that ship with dq (installed as the ``dq_pipelines`` package)."""
