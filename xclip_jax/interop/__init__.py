"""Checkpoint interop with PyTorch CLIP implementations (OpenAI CLIP, open_clip), without PyTorch.

torch_files.py     safetensors / torch.save zip / TorchScript archives -> {name: numpy array},
                   through an unpickler that only rebuilds tensors
openai_layout.py   OpenAI's state-dict layout <-> xclip_jax parameters; architecture from shapes
convert.py         CLI: checkpoint -> xclip_jax workdir (import), workdir -> safetensors (export)
The imported model's tokenizer is data/clip_bpe.py (config.tokenizer.kind = "clip_bpe").
"""
