"""rayft's ingress extends Ray Serve LLM's through services.ray_llm_compat: the private
hooks it overrides are really the ones the stock ingress calls (a refused adapter name
is refused through the stock `_get_model_id`), and the listing reads the stock state."""

from __future__ import annotations

import asyncio

import pytest
from fastapi import HTTPException

from services.ingress import RayftIngress
from services.ray_llm_compat import ModelCard


@pytest.fixture
def ingress():
    card = ModelCard(id="base", object="model", owned_by="rayft", permission=[], metadata={})
    return RayftIngress({"base": object()}, {"base": card}, adapters={"base": ["a"]})


def test_model_ids_go_through_rayfts_check(ingress):
    resolve = ingress._get_model_id  # the hook the stock request path calls
    assert asyncio.run(resolve("base")) == "base"
    assert asyncio.run(resolve("base:a")) == "base:a"
    assert asyncio.run(resolve(None)) == "base"  # the stock default: the only model
    with pytest.raises(HTTPException) as refused:
        asyncio.run(resolve("base:b"))
    assert refused.value.status_code == 404 and "adapters served over base: base:a" in refused.value.detail
    with pytest.raises(HTTPException, match="Could not find base model"):  # still refused by the stock check
        asyncio.run(resolve("other"))


def test_models_lists_the_bases_and_their_adapters(ingress):
    listed = asyncio.run(ingress.models())
    assert [card.id for card in listed.data] == ["base", "base:a"]
    assert listed.data[1].metadata == {"base_model_id": "base", "adapter": "a"}
    assert list(ingress.engine_handles) == ["base"]


def test_engines_skip_the_node_initialisation_task(tmp_path):
    """An engine config names rayft's callback, and the callback Ray Serve LLM then builds
    tells the engine start not to run the per-node "download" task (services.app serves
    local directories only)."""
    from services.app import engine_config
    from services.config import ServeConfig
    from services.models import ServedModel

    served = ServedModel(model_id="base", base_dir=str(tmp_path), adapters={}, max_lora_rank=0)
    llm_config = engine_config(ServeConfig(), served, use_gpu=False)
    callback = llm_config.get_or_create_callback()
    assert callback.ctx.run_init_node
    asyncio.run(callback.run_callback("on_before_node_init"))
    assert not callback.ctx.run_init_node
