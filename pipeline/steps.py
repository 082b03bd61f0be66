"""Registry callables whose library call does not take the entry's flat parameters directly.

``pipeline.registry`` names these as ``"pipeline.steps:<function>"``; each has the annotator
calling convention ``fn(catalog, dataset, workers=1, force=False, beam_args=None, **params)`` and
builds the stage's config objects (``TaggerConfig``, ``LLMConfig``) from the parameters. The
stages (Beam) are imported inside the functions, so importing this module stays cheap.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any


def _llm_config(endpoint: str, model: str, api_key_env: str, concurrency: int, timeout: float, retries: int,
                max_tokens: int):
    from pipeline.annotate.llm import LLMConfig

    if not endpoint or not model:
        raise ValueError("an llm annotator needs an endpoint URL and a model name")
    return LLMConfig(endpoint=endpoint, model=model, api_key=os.environ.get(api_key_env) or None,
                     concurrency=concurrency, timeout_s=timeout, max_retries=retries, max_tokens=max_tokens)


def offline_tags(catalog: str | Path, dataset: str, workers: int = 1, force: bool = False,
                 beam_args: list[str] | None = None, *, vocabulary: str | None = None, top_k: int | None = None,
                 threshold: float | None = None, tier: str = "fp32", device: str | None = None,
                 name: str | None = None) -> Any:
    from dataclasses import replace

    from pipeline.annotate.tags import TaggerConfig
    from pipeline.stages import instruction_annotations as stage

    config = TaggerConfig()
    if top_k is not None:
        config = replace(config, top_k=top_k)
    if threshold is not None:
        config = replace(config, threshold=threshold)
    return stage.run_tag_annotation(catalog, dataset, stage.OFFLINE_TAGS, vocabulary=vocabulary, tagger_config=config,
                                    device=device, tier=tier, name=name, workers=workers, beam_args=beam_args,
                                    force=force)


def llm_tags(catalog: str | Path, dataset: str, workers: int = 1, force: bool = False,
             beam_args: list[str] | None = None, *, endpoint: str, model: str,
             api_key_env: str = "THRESHER_LLM_API_KEY", concurrency: int = 8, timeout: float = 60.0,
             retries: int = 3, max_tokens: int = 512, cache: str | None = None, name: str | None = None) -> Any:
    from pipeline.stages import instruction_annotations as stage

    llm = _llm_config(endpoint, model, api_key_env, concurrency, timeout, retries, max_tokens)
    return stage.run_tag_annotation(catalog, dataset, stage.LLM_TAGS, llm=llm, cache_path=cache, name=name,
                                    workers=workers, beam_args=beam_args, force=force)


def offline_quality(catalog: str | Path, dataset: str, workers: int = 1, force: bool = False,
                    beam_args: list[str] | None = None, *, use_embeddings: bool = True, tier: str = "fp32",
                    name: str | None = None) -> Any:
    from pipeline.stages import instruction_annotations as stage

    return stage.run_quality_annotation(catalog, dataset, stage.OFFLINE_QUALITY, use_embeddings=use_embeddings,
                                        tier=tier, name=name, workers=workers, beam_args=beam_args, force=force)


def llm_quality(catalog: str | Path, dataset: str, workers: int = 1, force: bool = False,
                beam_args: list[str] | None = None, *, endpoint: str, model: str,
                api_key_env: str = "THRESHER_LLM_API_KEY", concurrency: int = 8, timeout: float = 60.0,
                retries: int = 3, max_tokens: int = 512, cache: str | None = None, name: str | None = None) -> Any:
    from pipeline.stages import instruction_annotations as stage

    llm = _llm_config(endpoint, model, api_key_env, concurrency, timeout, retries, max_tokens)
    return stage.run_quality_annotation(catalog, dataset, stage.LLM_QUALITY, llm=llm, cache_path=cache, name=name,
                                        workers=workers, beam_args=beam_args, force=force)
