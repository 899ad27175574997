"""Test helpers: tiny random-weight diffusers pipelines built offline."""

from dq.testing.tiny import (
    KINDS,
    default_call_kwargs,
    prompt_kwargs,
    prompts_for,
    tiny_pipeline,
)

__all__ = ["KINDS", "default_call_kwargs", "prompt_kwargs", "prompts_for", "tiny_pipeline"]
