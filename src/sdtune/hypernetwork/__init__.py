"""Hypernetworks: the NovelAI / AUTOMATIC1111 kind, in the `.pt` file format the web UIs load.

    spec.py          the structure (the web UI's creation options) and its layer plan; no torch
    module.py        the K/V module pairs as torch modules, built and initialised as the web UI does
    legacy_format.py torch's legacy `.pt` serialization, written deterministically
    files.py         reading and writing `.pt` / `.safetensors` hypernetwork files
    apply.py         applying one to a diffusers U-Net through every attention backend

Nothing is imported here, so the option checks can read `spec` without loading torch.
"""
