"""Teacher and student pipelined together through megatron-core's forward/backward schedules.

``DistillationStage`` holds this pipeline stage's slice of the frozen teacher and of the DMS student. Its forward runs
both on the same micro batch; between stages they travel as ONE activation tensor

    [s, 2 * b + 1, h]  =  cat(student hidden [s, b, h], teacher hidden [s, b, h], carry column [s, 1, h])

(``s`` is the local sequence length: seq_length / tp with sequence parallel), so the schedule must be told
``micro_batch_size = 2 * b + 1`` (``pipeline_micro_batch_size``). The carry column holds the per-sample running sum of
evicted fractions of the stages so far (``megatron.parallel_loss``); the teacher half is detached on arrival, so no
gradient reaches the teacher. The last stage returns (student logits, teacher logits, fraction sum), each logits
[b, s, V / tp] (vocabulary-sharded, padded vocabulary).

Megatron's DistributedDataParallel wraps the stage: the teacher's parameters have ``requires_grad=False`` and get no
gradient buffer, and checkpoints (``sharded_state_dict`` / ``state_dict``) hold the student only, with the same keys as
a bare student model, so they reshard across layouts and load into a plain student.
"""

from __future__ import annotations

from typing import Optional

import torch
from megatron.core.transformer.module import MegatronModule

from dms_megatron.megatron.parallel_loss import pack_stage_output, stage_fraction_sum, unpack_stage_input
from dms_megatron.megatron.runtime import DMSRuntime, dms_forward


def pipeline_micro_batch_size(micro_batch_size: int) -> int:
    """The batch width of a stage-to-stage message: student + teacher halves + the carry column."""
    return 2 * micro_batch_size + 1


class DistillationStage(MegatronModule):
    """One pipeline stage of (frozen teacher, DMS student). ``module`` is the student (megatron's attribute lookups
    through wrappers, e.g. ``pre_process`` or the shared embedding, reach the student)."""

    def __init__(self, teacher, student):
        super().__init__(config=student.config)
        self.student = student
        self.teacher = teacher
        teacher.eval().requires_grad_(False)
        self.pre_process, self.post_process = student.pre_process, student.post_process
        self._input: Optional[torch.Tensor] = None

    @property
    def module(self):
        return self.student

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name in ("student", "teacher", "_modules", "_parameters", "_buffers"):
                raise
            return getattr(self.student, name)  # e.g. share_embeddings_and_output_weights for finalize_model_grads

    def train(self, mode: bool = True):
        self.training = mode
        self.student.train(mode)
        self.teacher.eval()
        return self

    # -- pipeline plumbing -------------------------------------------------------------------------------------
    def set_input_tensor(self, input_tensor) -> None:
        if isinstance(input_tensor, (list, tuple)):
            if len(input_tensor) != 1:
                raise ValueError(f"DistillationStage takes one input tensor, got {len(input_tensor)}")
            input_tensor = input_tensor[0]
        self._input = input_tensor

    def forward(self, tokens, position_ids, attention_mask=None, runtime: Optional[DMSRuntime] = None):
        """tokens, position_ids: [b, s] (read by the first stage only). ``runtime``: the student's DMSRuntime for
        this micro batch (its ``fractions`` are filled by this stage's layers)."""
        b = tokens.shape[0]
        carry = None
        if self.pre_process:
            self.student.set_input_tensor(None)
            self.teacher.set_input_tensor(None)
        else:
            if self._input is None:
                raise RuntimeError("pipeline stage without an input tensor (set_input_tensor was not called)")
            hidden, carry = unpack_stage_input(self._input, b)
            self.student.set_input_tensor(hidden[:, :b].contiguous())
            self.teacher.set_input_tensor(hidden[:, b:2 * b].detach().contiguous())
        with torch.no_grad():
            t_out = self.teacher(tokens, position_ids, attention_mask)
        if runtime is None:
            raise ValueError("DistillationStage.forward needs the student's DMSRuntime")
        runtime.clear()
        with dms_forward(self.student, runtime):
            s_out = self.student(tokens, position_ids, attention_mask)
        if runtime.mode != "teacher":  # train: differentiable fractions; hard: evaluation's inference decisions
            local = stage_fraction_sum(runtime.fractions)
            carry = local if carry is None else carry + local
        if carry is None:
            carry = torch.zeros(b, dtype=torch.float32, device=s_out.device)
        if self.post_process:
            return s_out, t_out, carry
        return pack_stage_output(torch.cat([s_out, t_out], dim=1), carry)

    # -- checkpoints: the student only ---------------------------------------------------------------------------
    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (), metadata: Optional[dict] = None):
        return self.student.sharded_state_dict(prefix=prefix, sharded_offsets=sharded_offsets, metadata=metadata)

    def state_dict(self, *args, **kwargs):
        return self.student.state_dict(*args, **kwargs)

    def load_state_dict(self, state_dict, strict: bool = True):
        return self.student.load_state_dict(state_dict, strict=strict)


__all__ = ["DistillationStage", "pipeline_micro_batch_size"]
