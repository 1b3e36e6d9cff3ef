"""An Axolotl plugin: PEMA in an Axolotl run from its YAML config, on top of :func:`pema_triton.hf.compact_trainer`.

    plugins:
      - pema_triton.integrations.axolotl.PemaPlugin
    pema_output: frozen            # or restricted
    pema_fused_loss: false
    pema_embed_unscanned: false    # online trainers (GRPO): completions' unscanned ids embed frozen
    pema_keep: [151643]            # more ids to keep
    pema_trainable_ids: null       # train only these rows (new tokens); the other used ids stay frozen
    pema_embedding_lr: null        # a learning rate of their own for the embedding rows

Axolotl builds its trainer (a transformers / TRL Trainer subclass) and then calls `post_trainer_create`; the
optimizer does not exist yet (Axolotl builds it in `train()`), which is when `compact_trainer` must run. It scans
the datasets the trainer was given (Axolotl's tokenized ones: chat templates applied, truncated), compacts
`trainer.model` (the PeftModel where the config asks for LoRA), adapts TRL's fused head forward and adds
:class:`~pema_triton.hf.PemaCallback`, which restores the full matrices when training ends and writes full-size
checkpoints meanwhile.

Needs `axolotl` (its plugin base imports torch, transformers, peft and addict); tested with axolotl 0.19.0,
installed without its GPU-only dependencies (scripts/setup.sh).
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel

try:
    from axolotl.integrations.base import BasePlugin
except ImportError as err:  # pragma: no cover - the message is the point
    raise ImportError(f"pema_triton.integrations.axolotl needs axolotl's plugin base ({err}); install axolotl, or "
                      f"call pema_triton.hf.compact_trainer(trainer) yourself before trainer.train()") from err

from ..trainers import compact_trainer

__all__ = ["PemaArgs", "PemaPlugin"]


class PemaArgs(BaseModel):
    """The config keys PemaPlugin adds to Axolotl's schema (all optional; the defaults are compact_trainer's)."""

    pema_output: Literal["frozen", "restricted"] = "frozen"
    pema_fused_loss: bool = False
    pema_embed_unscanned: bool = False
    pema_keep: list[int] | None = None
    pema_trainable_ids: list[int] | None = None
    pema_embedding_lr: float | None = None


class PemaPlugin(BasePlugin):
    """Compacts the trainer's model once Axolotl has built the trainer. `handle` is the
    :class:`~pema_triton.PemaHandle` of the last run (None before)."""

    def __init__(self):
        super().__init__()
        self.handle = None

    def get_input_args(self) -> str:
        return f"{PemaArgs.__module__}.{PemaArgs.__name__}"

    def post_trainer_create(self, cfg, trainer) -> None:
        options = {"trainable_ids": cfg.get("pema_trainable_ids")} if cfg.get("pema_trainable_ids") else {}
        self.handle = compact_trainer(
            trainer, cfg.get("pema_output") or "frozen", fused_loss=bool(cfg.get("pema_fused_loss")),
            keep=cfg.get("pema_keep") or (), embed_unscanned=bool(cfg.get("pema_embed_unscanned")),
            embedding_lr=cfg.get("pema_embedding_lr"), **options)
