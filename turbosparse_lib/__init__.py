"""turbosparse_lib: a laptop-scale, runnable companion to *Turbo Sparse* (Song et al., 2024).

Packages, one concept each (each package's docstring lists its modules):

- ``paths``, ``presets``, ``atomic``, ``plotting``: where things live, the named run sizes, safe file writes,
  shared figure helpers.
- ``data``: offline corpora from package registries, mixture sampling, splits, our byte-level BPE tokenizer.
- ``models``: gated-MLP variants (SwiGLU ... dReLU) inside transformers models, our architecture, the MoE,
  SmolLM2-135M loaded from its GGUF file.
- ``sparsity``: activation instruments, top-k masks, neuron frequencies, expert statistics.
- ``eval``: perplexity, top-k sweeps, variant comparisons, zero-shot tasks.
- ``train``: training from scratch and ReLUfication (continued pretraining), checkpoints, DDP.
- ``predictors``: activation predictors, their data, training and mask provider.
- ``inference``: weight formats, Numba/LLVM kernels and the CPU decode engines (dense and MoE).
- ``bench``: timing runs, the bytes model, llama.cpp, projections to the paper's machines.
- ``paper``: the paper's numbers, this companion's targets, and the claims' verdicts.
- ``runner``: the headless papermill runner and notebook outputs.
"""

import warnings

__version__ = "0.1.0"

# tqdm.auto warns inside Jupyter when ipywidgets is absent; our bars are off there anyway.
warnings.filterwarnings("ignore", message="IProgress not found")
