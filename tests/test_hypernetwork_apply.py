"""A hypernetwork applied to a U-Net: the output an independent reading of its file gives, in every
attention backend, self- and cross-attention alike, and exactly the base model at multiplier 0."""

from __future__ import annotations

import copy

import pytest
import torch
from _hypernetwork_reference import ReferenceProcessor, read
from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0, SlicedAttnProcessor

from sdtune.errors import UserError
from sdtune.hypernetwork import apply, files
from sdtune.hypernetwork.module import new_hypernetwork
from sdtune.hypernetwork.spec import Structure
from sdtune.testing import build_tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest

STRUCTURES = [
    Structure(weight_initialization="XavierNormal"),  # NAI's 1, 2, 1 linear, with weights big enough to matter
    Structure(layer_structure=(1, 2, 2, 1), activation_func="swish", is_layer_norm=True,
              dropout_structure=(0, 0.1, 0.2, 0), weight_initialization="KaimingNormal"),
    Structure(layer_structure=(1, 1.5, 1), activation_func="tanh", activate_output=True,
              weight_initialization="XavierUniform"),
]


@pytest.fixture(scope="module", params=["sd1", "sd2"])
def unet(request):
    unet = build_tiny_model(request.param, seed=3).unet
    unet.set_attn_processor(AttnProcessor2_0())
    return unet


def inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(1, 4, 8, 8, generator=g), torch.tensor([700]), torch.randn(1, 8, 32, generator=g))


def run(unet, *args):
    with torch.no_grad():
        return unet(*args).sample


@pytest.mark.parametrize("structure", STRUCTURES, ids=["nai", "deep-swish-ln-dropout", "tanh-activated-output"])
def test_applied_file_gives_the_output_of_an_independent_implementation(unet, structure, tmp_path):
    # the tiny U-Nets' context widths: 16, 32, 64 in self-attention, 32 in cross-attention
    hn = new_hypernetwork(sorted(apply.attention_widths(unet)), structure, seed=5).eval()
    with torch.no_grad():  # the web UI's LayerNorm scales start near 0, which would hide the layers before them
        for m in hn.modules():
            if isinstance(m, torch.nn.LayerNorm):
                m.weight.add_(1.0)
    path = files.save(hn, tmp_path / "h.pt")
    loaded = files.load(path, multiplier=0.7).eval()
    x = inputs()
    base = run(unet, *x)
    with apply.attach(unet, loaded):
        ours = run(unet, *x)
    reference_unet = copy.deepcopy(unet)
    reference_unet.set_attn_processor(ReferenceProcessor(read(path), 0.7))
    theirs = run(reference_unet, *x)
    change = (theirs - base).abs().max()
    assert change > 1e-2  # the hypernetwork changes the output ...
    assert (ours - theirs).abs().max() < 1e-3 * change  # ... as the independent reading does (float32 rounding)
    assert torch.equal(run(unet, *x), base)  # detached: the base model again


def test_multiplier_zero_and_detach_give_the_base_output_exactly(unet):
    hn = new_hypernetwork(sorted(apply.attention_widths(unet)), STRUCTURES[1], seed=1).eval()
    x = inputs(1)
    base = run(unet, *x)
    attachment = apply.attach(unet, hn)
    hn.multiplier = 0.5
    half = run(unet, *x)
    hn.multiplier = 0.0
    assert torch.equal(run(unet, *x), base)
    hn.multiplier = 0.5
    assert torch.equal(run(unet, *x), half)
    hn.multiplier = 1.0
    assert not torch.equal(run(unet, *x), half)
    attachment.detach()
    assert torch.equal(run(unet, *x), base) and not attachment.attached


@pytest.mark.parametrize("processor", [AttnProcessor(), SlicedAttnProcessor(slice_size=1)], ids=["classic", "sliced"])
def test_every_attention_processor_applies_it(unet, processor):
    hn = new_hypernetwork(sorted(apply.attention_widths(unet)), STRUCTURES[0], seed=2)
    x = inputs(2)
    with apply.attach(unet, hn):
        sdpa = run(unet, *x)
    other = copy.deepcopy(unet)
    other.set_attn_processor(processor)
    base = run(other, *x)
    with apply.attach(other, hn):
        applied = run(other, *x)
    assert (applied - base).abs().max() > 1e-3 and torch.allclose(applied, sdpa, atol=1e-5)


def test_self_attention_gets_it_too(unet):
    """Width 16 occurs only in the first level's self-attention (the text context is 32 wide)."""
    x = inputs(3)
    base = run(unet, *x)
    only_16 = new_hypernetwork([16], STRUCTURES[0], seed=4)
    with apply.attach(unet, only_16) as attachment:
        assert (run(unet, *x) - base).abs().max() > 1e-3
    assert sum(name.endswith("attn1") for name in attachment.layer_names) == sum(
        name.endswith("attn2") for name in attachment.layer_names) > 0


def test_two_hypernetworks_chain_like_the_web_ui(unet):
    x = inputs(4)
    first = new_hypernetwork([16, 32, 64], STRUCTURES[0], seed=6)
    second = new_hypernetwork([32], STRUCTURES[2], seed=7)
    with apply.attach(unet, first), apply.attach(unet, second):
        chained = run(unet, *x)
    reference_unet = copy.deepcopy(unet)

    def both(width):  # the second transforms what the first produced
        f = first.pair(width)
        s = second.pair(width)
        out = []
        for i in (0, 1):
            def g(c, i=i, f=f, s=s):
                c1 = c + f[i].linear(c.float()).double() if f else c
                return (c1 + s[i].linear(c1.float()).double() if s else c1) - c
            out.append(g)
        return tuple(out)

    reference_unet.set_attn_processor(ReferenceProcessor({w: both(w) for w in (16, 32, 64)}, 1.0))
    assert torch.allclose(chained, run(reference_unet, *x), atol=1e-5)


def test_only_the_hypernetwork_trains():
    model = build_tiny_model("sd1", seed=3)
    hn = new_hypernetwork(sorted(apply.attention_widths(model.unet)), STRUCTURES[0], seed=8)
    params = apply.trainable_parameters(hn, model.unet, model.text_encoder, model.vae)
    assert [id(p) for p in params] == [id(p) for p in hn.parameters()] and len(params) == 3 * 2 * 4
    with apply.attach(model.unet, hn):
        model.unet(*inputs(5)).sample.square().mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in params)
    assert all(p.grad is None and not p.requires_grad for p in model.unet.parameters())


def test_fused_projections_are_refused(unet):
    fused = copy.deepcopy(unet)
    fused.fuse_qkv_projections()
    with pytest.raises(UserError, match="fused key/value projections"):
        apply.attach(fused, new_hypernetwork([16], Structure(), seed=0))


def test_the_gpu_processors_form_keys_and_values_where_the_hooks_sit():
    """xformers needs CUDA, so on a CPU its processor cannot run: its source must at least compute
    the keys and values through the hooked projections, from the context, as the others do."""
    import inspect

    from diffusers.models.attention_processor import XFormersAttnProcessor

    for processor in (XFormersAttnProcessor, AttnProcessor2_0, AttnProcessor, SlicedAttnProcessor):
        source = inspect.getsource(processor.__call__)
        assert "attn.to_k(encoder_hidden_states" in source and "attn.to_v(encoder_hidden_states" in source
        assert "encoder_hidden_states = hidden_states" in source  # self-attention: the context is the input


@pytest.mark.skipif(not torch.cuda.is_available(), reason="xformers and the memory-efficient SDPA kernel need CUDA")
def test_gpu_backends_apply_it(unet):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    gpu = copy.deepcopy(unet).cuda().half()
    hn = new_hypernetwork([16, 32, 64], STRUCTURES[0], seed=9).cuda()
    x = tuple(t.cuda() for t in inputs(6))
    x = (x[0].half(), x[1], x[2].half())
    base = run(gpu, *x)
    with apply.attach(gpu, hn):
        with sdpa_kernel([SDPBackend.EFFICIENT_ATTENTION]):
            mem_eff = run(gpu, *x)
        outputs = [mem_eff]
        try:
            import xformers  # noqa: F401
        except ImportError:
            xformers = None
        if xformers is not None:
            gpu.enable_xformers_memory_efficient_attention()
            outputs.append(run(gpu, *x))
    for out in outputs:
        assert (out - base).abs().max() > 1e-2 and torch.allclose(out, outputs[0], atol=2e-3)


@pytest.mark.parametrize("family", ["sd1", "sd2", "sd2-v"])
def test_the_widths_read_from_a_config_are_the_models(family):
    """--dry_run loads no model: it reads the widths from the family's U-Net config."""
    import json

    from diffusers import UNet2DConditionModel

    from sdtune.families import get_family
    from sdtune.hypernetwork.spec import attention_widths_from_config
    from sdtune.testing import tiny_config

    real = json.loads((get_family(family).asset_dir / "unet" / "config.json").read_text())
    with torch.device("meta"):  # the full-size U-Net's layers without its memory
        full_size = UNet2DConditionModel.from_config(real)
    assert attention_widths_from_config(real) == apply.attention_widths(full_size) == (
        {320, 640, 1280, 768} if family == "sd1" else {320, 640, 1280, 1024})
    tiny = tiny_config(family, "unet")
    assert attention_widths_from_config(tiny) == apply.attention_widths(UNet2DConditionModel.from_config(tiny))
