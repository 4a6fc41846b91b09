"""Typed application keys: the front end's shared objects live on the app, never in globals."""

from __future__ import annotations

import os
from dataclasses import dataclass

from aiohttp import web

from tetri.config import ServerConfig
from tetri.server.engine_api import EngineClient
from tetri.server.metrics import Metrics
from tetri.server.tokenizer import Tokenizer


@dataclass
class ServerState:
    """What the app learns at start-up (the engine names the model directory)."""

    served_name: str
    tokenizer: Tokenizer | None = None
    draining: bool = False

    @property
    def tok(self) -> Tokenizer:
        if self.tokenizer is None:
            raise RuntimeError("the tokenizer is loaded when the app starts")
        return self.tokenizer


def served_model_name(cfg: ServerConfig, engine: EngineClient) -> str:
    return cfg.served_model_name or os.path.basename(os.path.normpath(engine.model_dir))


CONFIG = web.AppKey("config", ServerConfig)
ENGINE = web.AppKey("engine", EngineClient)
METRICS = web.AppKey("metrics", Metrics)
STATE = web.AppKey("state", ServerState)
