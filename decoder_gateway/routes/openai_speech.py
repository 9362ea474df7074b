"""Placeholder router; filled in by the OpenAI-compatible / web page work."""

from __future__ import annotations

from fastapi import APIRouter

router = APIRouter()
