"""Hypernetwork files: the web UI's `.pt` layout exactly, loadable by weights-only and restricted
unpicklers, byte-identical round trips, files made by the web UI and sd-scripts, and one line for a
bad file."""

from __future__ import annotations

import io
import pickle
import zipfile
from collections import OrderedDict

import pytest
import torch
from _hypernetwork_reference import expected_keys, meta_of, mlp

from sdtune.errors import UserError
from sdtune.hypernetwork import files
from sdtune.hypernetwork.module import Hypernetwork, new_hypernetwork
from sdtune.hypernetwork.spec import METADATA_KEYS, Structure

# The web UI's key numbering for one module of width d, from the format's description.
LAYOUTS = [
    (Structure(), ["linear.0", "linear.1"]),
    (Structure(activation_func="relu"), ["linear.0", "linear.2"]),
    (Structure(activation_func="relu", activate_output=True), ["linear.0", "linear.2"]),
    (Structure(activation_func="relu", is_layer_norm=True), ["linear.0", "linear.2", "linear.3", "linear.4"]),
    (Structure(dropout_structure=(0, 0.3, 0)), ["linear.0", "linear.2"]),
    (Structure(layer_structure=(1, 2, 2, 1), activation_func="swish", dropout_structure=(0, 0.3, 0.3, 0)),
     ["linear.0", "linear.3", "linear.6"]),
]


def keys_of(prefixes):
    return [f"{p}.{x}" for p in prefixes for x in ("weight", "bias")]


@pytest.mark.parametrize("structure,prefixes", LAYOUTS)
def test_key_numbering_is_the_web_uis(structure, prefixes, tmp_path):
    path = files.save(new_hypernetwork([8, 12], structure, seed=0), tmp_path / "h.pt")
    obj = torch.load(path, weights_only=True)
    for width in (8, 12):
        assert isinstance(obj[width], tuple) and len(obj[width]) == 2
        for state in obj[width]:
            assert isinstance(state, OrderedDict) and list(state) == keys_of(prefixes)  # module order, weight first
            assert {k: tuple(v.shape) for k, v in state.items()} == expected_keys(meta_of(obj), width)


def test_every_metadata_key_is_written_with_plain_values(tmp_path):
    structure = Structure(layer_structure=(1, 1.5, 1), activation_func="mish", dropout_structure=(0, 0.2, 0))
    path = files.save(new_hypernetwork([768, 320], structure, seed=0), tmp_path / "anime.pt")
    obj = torch.load(path, weights_only=True)
    assert list(obj) == [768, 320, *METADATA_KEYS] and all(type(k) is int for k in list(obj)[:2])
    assert {k: obj[k] for k in METADATA_KEYS} == {
        "step": 0, "name": "anime", "layer_structure": [1, 1.5, 1], "activation_func": "mish", "is_layer_norm": False,
        "weight_initialization": "Normal", "sd_checkpoint": None, "sd_checkpoint_name": None, "activate_output": False,
        "use_dropout": True, "dropout_structure": [0, 0.2, 0], "last_layer_dropout": True, "optional_info": None}
    assert obj[768][0]["linear.0.weight"].shape == (1152, 768)


def test_parameter_counts_of_the_common_sets():
    nai = Structure()
    pair = {w: 2 * nai.parameter_count(w) for w in (320, 640, 768, 1024, 1280)}
    assert pair == {320: 821_120, 640: 3_280_640, 768: 4_723_200, 1024: 8_394_752, 1280: 13_114_880}
    assert sum(pair[w] for w in (320, 640, 768, 1280)) == 21_939_840  # SD1's set
    assert sum(pair[w] for w in (320, 640, 1024, 1280)) == 25_611_392  # SD2's set
    assert 2 * Structure(is_layer_norm=True).parameter_count(320) == 824_960
    assert 2 * Structure(layer_structure=(1, 2, 2, 1)).parameter_count(768) == 9_444_864
    assert Hypernetwork([320], Structure(layer_structure=(1, 2, 2, 1), is_layer_norm=True)).parameter_count() == \
        2 * Structure(layer_structure=(1, 2, 2, 1), is_layer_norm=True).parameter_count(320) == 2 * (
            320 * 640 + 640 + 2 * 640 + 640 * 640 + 640 + 2 * 640 + 640 * 320 + 320 + 2 * 320)


@pytest.mark.parametrize("structure", [s for s, _ in LAYOUTS[::2]])
@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_save_load_save_gives_the_same_bytes(structure, suffix, tmp_path):
    (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir()
    first = files.save(new_hypernetwork([8, 16], structure, seed=1), tmp_path / "a" / f"h{suffix}")
    second = files.save(files.load(first), tmp_path / "b" / f"h{suffix}")
    assert first.read_bytes() == second.read_bytes()
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == [f"h{suffix}"]  # no temporary file left


def test_safetensors_and_pt_hold_the_same_hypernetwork(tmp_path):
    hn = new_hypernetwork([8, 16], Structure(activation_func="elu", is_layer_norm=True), seed=2)
    pt = files.save(hn, tmp_path / "h.pt")
    again = files.save(files.load(files.save(hn, tmp_path / "h.safetensors")), tmp_path / "x" / "h.pt")
    assert pt.read_bytes() == again.read_bytes()


def test_fp16_files_stay_fp16(tmp_path):
    path = files.save(new_hypernetwork([8], Structure(), seed=3), tmp_path / "h.pt", dtype=torch.float16)
    assert torch.load(path, weights_only=True)[8][0]["linear.0.weight"].dtype == torch.float16
    loaded = files.load(path)
    assert next(loaded.parameters()).dtype == torch.float16
    assert files.save(loaded, tmp_path / "b" / "h.pt").read_bytes() == path.read_bytes()


# The globals the web UI's restricted unpickler allows (collections, torch rebuild functions, storages).
WEB_UI_ALLOWED = {("collections", "OrderedDict"), ("torch._utils", "_rebuild_tensor_v2"),
                  ("torch", "FloatStorage"), ("torch", "HalfStorage")}


class RestrictedUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        if (module, name) in WEB_UI_ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"global {module}.{name} is forbidden")

    def persistent_load(self, saved_id):  # the check reads structure only; storages stay empty
        assert saved_id[0] == "storage"
        return torch.storage.TypedStorage(_internal=True)


def test_the_file_is_legacy_and_passes_restricted_unpicklers(tmp_path):
    path = files.save(new_hypernetwork([8], Structure(activation_func="relu", is_layer_norm=True), seed=4),
                      tmp_path / "h.pt")
    assert not zipfile.is_zipfile(path)  # no zip members for the web UI's member check to refuse
    with open(path, "rb") as fh:
        unpickler = RestrictedUnpickler(fh)
        magic, version, _sys_info, obj, keys = (unpickler.load() for _ in range(5))
    assert (magic, version) == (0x1950A86A20F9469CFC6C, 1001)
    assert isinstance(obj, dict) and len(keys) == 2 * 4 * 2  # K and V, two Linears and two LayerNorms, weight and bias
    assert files.load(path).parameter_count() == 2 * Structure(is_layer_norm=True).parameter_count(8)


# ------------------------------------------------------------------------------- files made elsewhere


def web_ui_file(widths, meta: dict, seed=0, old_keys=False, as_list=False) -> dict:
    """A dict as the web UI (or sd-scripts, with no metadata and lists) writes it, made from the
    format's description with random weights."""
    g = torch.Generator().manual_seed(seed)
    obj = {}
    for w in widths:
        pair = []
        for _ in range(2):
            state = OrderedDict((k, torch.randn(shape, generator=g) * 0.3)
                                for k, shape in expected_keys(meta_of(meta), w).items())
            if old_keys:
                state = OrderedDict((k.replace("linear.0.", "linear1.").replace("linear.1.", "linear2."), v)
                                    for k, v in state.items())
            pair.append(state)
        obj[w] = pair if as_list else tuple(pair)
    obj.update(meta)
    return obj


WEB_UI_META = [
    {"layer_structure": [1.0, 2.0, 1.0], "activation_func": "linear", "is_layer_norm": False,
     "weight_initialization": "Normal", "use_dropout": False, "dropout_structure": [0, 0, 0],
     "last_layer_dropout": False, "activate_output": False, "step": 1500, "name": "x", "sd_checkpoint": "0123456789",
     "sd_checkpoint_name": "anything-v3", "optional_info": "made by the web UI"},
    {"layer_structure": [1.0, 2.0, 2.0, 1.0], "activation_func": "relu", "is_layer_norm": True,
     "weight_initialization": "KaimingNormal", "use_dropout": True, "dropout_structure": [0.0, 0.05, 0.15, 0.0],
     "last_layer_dropout": True, "activate_output": False},
    {"layer_structure": [1, 1.5, 1], "activation_func": "swish", "activate_output": True},  # older: no dropout keys
    {"layer_structure": [1, 2, 2, 1], "activation_func": "tanh", "use_dropout": True, "last_layer_dropout": False},
    {"layer_structure": [1, 2, 1], "activation_func": None, "is_layer_norm": True},  # None reads as linear
    {"layer_structure": [1, 2, 1], "activation_func": "leakyrelu"},  # activate_output missing: True, as the web UI
]


@pytest.mark.parametrize("meta", WEB_UI_META, ids=range(len(WEB_UI_META)))
def test_web_ui_files_load_and_compute_what_the_format_says(meta, tmp_path):
    obj = web_ui_file([8, 12], meta)
    torch.save(obj, tmp_path / "webui.pt")  # the zip format the web UI writes with current torch
    hn = files.load(tmp_path / "webui.pt").eval()
    for width in (8, 12):
        x = torch.randn(3, width)
        for index in (0, 1):
            expected = x.double() + mlp(obj[width][index], meta_of(obj), width)(x.double()) * 0.5
            assert torch.allclose(hn.pair(width)[index](x, 0.5).double(), expected, atol=1e-5)
    again = torch.load(files.save(hn, tmp_path / "again.pt"), weights_only=True)
    assert again["step"] == meta.get("step", 0) and again["layer_structure"] == meta["layer_structure"]
    assert again["sd_checkpoint_name"] == meta.get("sd_checkpoint_name")
    assert again["activate_output"] == meta_of(meta)["ao"] and again["dropout_structure"] == meta_of(meta)["ds"]


def test_sd_scripts_and_old_nai_files_load(tmp_path):
    sd_scripts = web_ui_file([8, 16], {}, seed=5, as_list=True)  # lists, no metadata at all
    nai = web_ui_file([8, 16], {}, seed=5, old_keys=True)
    torch.save(sd_scripts, tmp_path / "sd.pt")
    torch.save(nai, tmp_path / "nai.pt")
    a, b = files.load(tmp_path / "sd.pt"), files.load(tmp_path / "nai.pt")
    assert a.structure == b.structure == Structure(activate_output=True)
    x = torch.randn(2, 16)
    assert torch.equal(a.pair(16)[1](x), b.pair(16)[1](x))
    assert torch.equal(b.pair(16)[1].linear[1].weight, nai[16][1]["linear2.weight"])


# ------------------------------------------------------------------------------- bad files


def bad_files(tmp_path):
    good = files.save(new_hypernetwork([8], Structure(), seed=6), tmp_path / "good.pt")
    cases = {"missing.pt": None, "text.pt": b"hello, not a pickle", "truncated.pt": good.read_bytes()[:300]}
    evil = io.BytesIO()
    pickle.dump({8: print}, evil)
    cases["evil.pt"] = evil.getvalue()
    buffers = {
        "lora.pt": {"lora_unet_x.lora_down.weight": torch.zeros(2, 2)},
        "tensor.pt": torch.zeros(3),
        "mismatch.pt": {**web_ui_file([8], {}), "activation_func": "relu"},  # keys 0, 1; relu would need 0, 2
        "shape.pt": {8: tuple(OrderedDict((k, v[:1]) for k, v in s.items()) for s in web_ui_file([8], {})[8]),
                     "layer_structure": [1, 2, 1]},
        "activation.pt": {**web_ui_file([8], {}), "activation_func": "prelu"},
        "structure.pt": {**web_ui_file([8], {}), "layer_structure": [2, 2, 1]},
        "metadata.pt": {**web_ui_file([8], {}), "is_layer_norm": "yes"},
        "pair.pt": {8: web_ui_file([8], {})[8][0]},
    }
    for name, obj in buffers.items():
        buffer = io.BytesIO()
        torch.save(obj, buffer)
        cases[name] = buffer.getvalue()
    for name, data in cases.items():
        if data is not None:
            (tmp_path / name).write_bytes(data)
    (tmp_path / "plain.safetensors").write_bytes(b"")
    from safetensors.torch import save_file

    save_file({"a": torch.zeros(1)}, str(tmp_path / "other.safetensors"))
    return [tmp_path / n for n in (*cases, "plain.safetensors", "other.safetensors")]


def test_bad_files_are_one_line(tmp_path):
    messages = {}
    for path in bad_files(tmp_path):
        with pytest.raises(UserError) as info:
            files.load(path)
        message = str(info.value)
        assert "\n" not in message and message.startswith(str(path)), message
        messages[path.name] = message
    assert "not found" in messages["missing.pt"]
    assert "nothing in it was run" in messages["evil.pt"]
    assert "no width entries" in messages["lora.pt"]
    assert "missing linear.2.bias, linear.2.weight" in messages["mismatch.pt"] and "width 8, K module" in messages["mismatch.pt"]
    assert "wrong shape of" in messages["shape.pt"] and "linear.0.weight [1, 8] (expected [16, 8])" in messages["shape.pt"]
    assert "'prelu' is not supported" in messages["activation.pt"]
    assert "must start and end with 1" in messages["structure.pt"]
    assert "is_layer_norm is a str" in messages["metadata.pt"]
    assert "not the pair of K and V" in messages["pair.pt"]
    assert "not a hypernetwork written by sdtune" in messages["other.safetensors"]


def test_a_wrong_suffix_is_refused_before_writing(tmp_path):
    with pytest.raises(UserError, match=r"must end in \.pt or \.safetensors"):
        files.save(new_hypernetwork([8], Structure(), seed=0), tmp_path / "h.ckpt")
    assert list(tmp_path.iterdir()) == []


def test_dry_run_lines_count_the_parameters_and_name_dead_widths():
    from sdtune.hypernetwork.spec import plan_lines, resolve_widths

    sd1 = {320, 640, 1280, 768}
    widths = resolve_widths(None, sd1)
    assert widths == (320, 640, 768, 1280)
    (line,) = plan_lines(Structure(), widths, sd1)
    assert "21,939,840 parameters, 83.7 MiB in float32" in line and "1, 2, 1, linear" in line
    lines = plan_lines(Structure(), resolve_widths([768, 320, 640, 1024, 1280], {320, 640, 1280, 1024}),
                       {320, 640, 1280, 1024})
    assert "30,334,592 parameters" in lines[0]  # all five widths
    assert lines[1].startswith("note: no attention layer of this model has context width 768:")


def test_base_checkpoint_fields_are_the_web_uis_short_hash(tmp_path):
    import hashlib

    model = tmp_path / "my-model.safetensors"
    model.write_bytes(bytes(range(256)) * 5000)
    assert files.base_checkpoint_fields(model) == {"sd_checkpoint": hashlib.sha256(model.read_bytes()).hexdigest()[:10],
                                                   "sd_checkpoint_name": "my-model"}
    assert files.base_checkpoint_fields(tmp_path) == {"sd_checkpoint": None, "sd_checkpoint_name": None}


@pytest.mark.parametrize("structure", [Structure(), Structure(activation_func="relu"),
                                       Structure(layer_structure=(1, 2, 2, 1), activation_func="mish",
                                                 activate_output=True)], ids=["nai", "relu", "deep-mish-activated"])
def test_the_web_ui_and_comfyui_rules_read_our_file_alike(structure, tmp_path):
    from _hypernetwork_reference import comfyui_mlp

    hn = new_hypernetwork([8], structure, seed=7)
    obj = torch.load(files.save(hn, tmp_path / "h.pt"), weights_only=True)
    x = torch.randn(4, 8, dtype=torch.float64)
    for index in (0, 1):
        web_ui = mlp(obj[8][index], meta_of(obj), 8)(x)
        assert torch.allclose(comfyui_mlp(obj[8][index], obj)(x), web_ui, atol=1e-12)
        assert torch.allclose(hn.pair(8)[index].linear(x.float()).double(), web_ui, atol=1e-6)
