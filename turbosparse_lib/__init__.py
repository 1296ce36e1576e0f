"""turbosparse_lib: a laptop-scale, runnable companion to *Turbo Sparse* (Song et al., 2024).

Modules, one concept each:

- ``paths``, ``presets``, ``atomic``: where things live, the named run sizes, safe file writes.
- ``data``: offline corpora from package registries, mixture sampling, splits.
- ``tokenizer``: the byte-level BPE trained on our training split.
- ``pretrained``: SmolLM2-135M (a real SwiGLU Llama) loaded from its GGUF file.
- ``variants``, ``modeling``: gated-MLP variants (SwiGLU ... dReLU) inside transformers models.
- ``sparsity``, ``perplexity``: activation instruments, top-k masking, evaluation.
- ``training``, ``zeroshot``: training from scratch / continued pretraining, zero-shot tasks.
- ``kernels``, ``engine``: Numba sparse GEMV kernels and a CPU decode engine.
- ``notebooks``: the headless papermill runner.
"""

import warnings

__version__ = "0.1.0"

# tqdm.auto warns inside Jupyter when ipywidgets is absent; our bars are off there anyway.
warnings.filterwarnings("ignore", message="IProgress not found")
