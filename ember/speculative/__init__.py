"""Speculative decoding: drafters that propose tokens for the target model to verify.

A drafter (`Drafter`, the protocol) proposes up to k tokens after a context; generation
(`ember.runtime.generate`) verifies them in one k+1-row `Session.feed` of the target and tells
the drafter how many it accepted. Two drafters:

- `PromptLookup`: the tokens that followed the latest earlier occurrence of the context's last
  n tokens (prompt-lookup / n-gram drafting; free, strong when the reply echoes the prompt);
- `ModelDrafter`: a smaller model with the target's vocabulary (`qwen2.5-coder-0.5b` for
  `qwen2.5-coder-1.5b`), on a session of its own; on the CPU from a 4-bit copy of its file
  (`light_copy`: fewer bytes a drafted token, lossless since the target verifies).

`make_drafter(spec, target)` builds one from `ember.load(..., draft=spec)`. See docs/speculative.md.
"""

from .base import Drafter
from .light import QUANTS, light_copy
from .lookup import PromptLookup
from .model import ModelDrafter, check_same_vocabulary

__all__ = ["QUANTS", "Drafter", "ModelDrafter", "PromptLookup", "check_same_vocabulary", "light_copy"]
