"""What ``python -m engine.train --compile`` compiles (issue 15).

* **CUDA** — the model's whole forward, ``torch.compile(dynamic=True)`` (with ``--cuda-graph`` the whole step
  is captured around it): there the step is launch-bound and one graph is what pays.
* **CPU** — only the Convolutional Fuser's conv-block stack (:data:`CPU_REGIONS`: ``ConvolutionalBlocks``, its
  blocks unrolled in one graph). Not each ``ConvolutionalBlock`` on its own: the blocks share one code
  object, and the first block's input (a permuted view) and the others' (fresh tensors), x train / eval
  (grad mode) x batch >= 16 or not (a guard from the CPU convolution's layout choice) were 8 graphs of it,
  dynamo's recompile limit, which the built-in job hit in its evaluation (then that frame ran eagerly, with a
  warning); the stack is 4. On the CPU nothing compiled makes the training step faster: measured on 2
  cores at the built-in job's shapes (B=32, L=28; eager step ~0.64 s), each region class compiled alone
  against the eager step in the same process (median of 8 alternating pairs, eager / compiled):
  ConvolutionalBlock 1.003 (cold compile 47 s), TransformerDecoderLayer 1.000 (101 s), T2V + encoder
  layers 0.992 (63 s), UnimodalEncoder 0.973 (21 s); the whole forward + backward took ~13 min to compile
  cold. The GEMMs are MKL's either way and the step is compute-bound. So on the CPU ``--compile``
  compiles the one region that is not slower (~1 min of compiling in the main job) and keeps the rest
  eager: it checks that the capture works on this machine; it is not a speed-up.

Both use ``dynamic=True``: the batch's length is symbolic, so a new length is not a recompile.
"""

from __future__ import annotations

import torch
from torch import nn

from reference.conv_blocks import ConvolutionalBlocks

#: the module classes compiled in place on the CPU (each instance; instances of a class share the code)
CPU_REGIONS = (ConvolutionalBlocks,)


def compile_for_training(run_model: nn.Module, model: nn.Module, device: torch.device, backend: str = "inductor"):
    """The callable the training step runs: ``run_model`` (the model, or its DDP wrapper) compiled as the
    module docstring says. On the CPU the regions of ``model`` are compiled in place and ``run_model`` is
    returned as is; on CUDA the compiled whole forward is returned."""
    if device.type != "cpu":
        return torch.compile(run_model, dynamic=True, backend=backend)
    for module in model.modules():
        if isinstance(module, CPU_REGIONS):
            module.compile(dynamic=True, backend=backend)
    return run_model


__all__ = ["CPU_REGIONS", "compile_for_training"]
