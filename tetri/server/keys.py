"""Typed application keys: the front end's shared objects live on the app, never in globals."""

from __future__ import annotations

import os
from dataclasses import dataclass

from aiohttp import web

from tetri.config import ServerConfig
from tetri.server.engine_api import EngineClient
from tetri.server.grammar_check import GrammarChecker
from tetri.server.metrics import Metrics
from tetri.server.tokenizer import Tokenizer


@dataclass
class ServerState:
    """What the app learns at start-up (the engine names the model directory)."""

    served_names: tuple[str, ...]
    """Every name the model answers to; the first is the one responses report."""
    tokenizer: Tokenizer | None = None
    draining: bool = False
    grammar: GrammarChecker | None = None
    """Checks that request grammars compile (structured outputs, tool calls) before admission."""

    @property
    def served_name(self) -> str:
        return self.served_names[0] if self.served_names else ""

    @property
    def tok(self) -> Tokenizer:
        if self.tokenizer is None:
            raise RuntimeError("the tokenizer is loaded when the app starts")
        return self.tokenizer


def served_model_names(cfg: ServerConfig, engine: EngineClient) -> tuple[str, ...]:
    names = cfg.served_model_name
    if isinstance(names, str):
        return (names,)
    if names:
        return tuple(names)
    return (os.path.basename(os.path.normpath(engine.model_dir)),)


CONFIG = web.AppKey("config", ServerConfig)
ENGINE = web.AppKey("engine", EngineClient)
METRICS = web.AppKey("metrics", Metrics)
STATE = web.AppKey("state", ServerState)
