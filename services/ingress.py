"""The HTTP front of a served model: Ray Serve LLM's OpenAI ingress with what rayft adds.

- routes: `/v1/chat/completions`, `/v1/completions` (both stream), `/v1/models`,
  `/v1/models/{id}`, `/tokenize`, `/detokenize`, and `/health` (engines alive);
- the adapters served over each base are listed by `/v1/models` and are the only
  `<base>:<adapter>` names accepted (404 for any other);
- the API key middleware and OpenAI-style errors for every failure (services.errors).
"""

from __future__ import annotations

import asyncio

from fastapi import FastAPI, HTTPException
from ray.serve.exceptions import BackPressureError
from starlette.responses import JSONResponse

from services.auth import ApiKeyMiddleware
from services.errors import UNAVAILABLE, Unavailable, install_error_handlers
from services.ray_llm_compat import (DEFAULT_ENDPOINTS, IngressBase, ModelCard, ModelList, SetRequestIdMiddleware,
                                     make_fastapi_ingress, metrics_lifespan)

HEALTH_TIMEOUT_S = 10.0
SERVED_ENDPOINTS = ("models", "model_data", "completions", "chat", "tokenize", "detokenize")


class RayftIngress(IngressBase):
    def __init__(self, llm_deployments, model_cards, *, adapters: dict[str, list[str]]):
        super().__init__(llm_deployments, model_cards)
        self._adapters = {base: list(names) for base, names in adapters.items()}

    def served_model_id(self, model: str) -> str:
        base, _, adapter = model.partition(":")
        if adapter and adapter not in self._adapters.get(base, []):
            served = ", ".join(f"{base}:{name}" for name in self._adapters.get(base, [])) or "none"
            raise HTTPException(404, f"model '{model}' not found (adapters served over {base}: {served})")
        return model

    def request_error(self, exc: Exception) -> Exception | None:
        if isinstance(exc, UNAVAILABLE):
            return Unavailable(overloaded=isinstance(exc, BackPressureError))
        return None

    async def model(self, model_id: str) -> ModelCard | None:
        base, _, adapter = model_id.partition(":")
        card = self.model_cards.get(base)
        if card is None or (adapter and adapter not in self._adapters.get(base, [])):
            return None
        if not adapter:
            return card
        return ModelCard(id=model_id, object="model", owned_by=card.owned_by, permission=list(card.permission),
                         metadata={**card.metadata, "base_model_id": base, "adapter": adapter})

    async def models(self) -> ModelList:
        ids = [m for base in self.model_cards for m in [base] + [f"{base}:{a}" for a in self._adapters.get(base, [])]]
        return ModelList(data=[await self.model(m) for m in ids])

    async def health(self) -> JSONResponse:
        """Each base model's engine answers its health check (a replica restarting does not)."""
        engines = {}
        for model_id, handle in self.engine_handles.items():
            try:
                await asyncio.wait_for(_awaitable(handle.check_health.remote()), HEALTH_TIMEOUT_S)
                engines[model_id] = "alive"
            except Exception as exc:  # noqa: BLE001 - any failure means not serving
                engines[model_id] = f"unavailable ({type(exc).__name__})"
        healthy = all(state == "alive" for state in engines.values())
        return JSONResponse({"status": "ok" if healthy else "unavailable", "engines": engines},
                            status_code=200 if healthy else 503)


async def _awaitable(response):
    return await response


def ingress_class(api_key_digest: str | None, retry_after_s: int):
    """`RayftIngress` bound to a FastAPI app with the key check and the error handlers.
    Starlette runs the last-added middleware first: request id, then the key check."""
    app = FastAPI(lifespan=metrics_lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    install_error_handlers(app, retry_after_s)
    app.add_middleware(ApiKeyMiddleware, digest=api_key_digest)
    app.add_middleware(SetRequestIdMiddleware)
    endpoints = {name: DEFAULT_ENDPOINTS[name] for name in SERVED_ENDPOINTS}
    endpoints["health"] = lambda fastapi_app: fastapi_app.get("/health")
    return make_fastapi_ingress(RayftIngress, endpoint_map=endpoints, app=app)
