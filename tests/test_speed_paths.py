"""The faster paths give the same pictures: int8, auto precision, batched tiles and images, ONNX export and backend."""

import contextlib
import ctypes
import io
import json
import sys
import time

import numpy as np
import psutil
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from tests.conftest import TINY_STUDENT, make_kl, make_sd3, make_student, make_tiny_vae, perturb, random_image
from tests.test_cli import cli, main_in_process, photo
from tinysr import TinySRPipeline, TinySRTransformer
from tinysr import device as device_module
from tinysr.cli import main
from tinysr.device import resolve_precision
from tinysr.errors import MissingWeightsError, UnsupportedOption
from tinysr.onnx import OnnxPipeline, export_onnx
from tinysr.pipelines import TSDSRPipeline, load_pipeline
from tinysr.pipelines.base import processing_size
from tinysr.quantization import int8_engine, quantize_linears_int8
from tinysr.tiling import tile_boxes


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(10 * torch.log10(1 / ((a - b) ** 2).mean()))


def tiny_tsdsr():
    g = torch.Generator().manual_seed(1)
    return TSDSRPipeline(make_sd3(), make_kl(), torch.randn(1, 5, 32, generator=g), torch.randn(1, 24, generator=g))


def test_auto_precision_follows_the_device(monkeypatch):
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    monkeypatch.setattr(device_module, "native_bf16", lambda: False)
    assert resolve_precision("auto", cpu) == "fp32"
    monkeypatch.setattr(device_module, "native_bf16", lambda: True)
    assert resolve_precision("auto", cpu) == "bf16"
    assert resolve_precision("auto", cuda) == "fp16" and resolve_precision("int8", cpu) == "int8"
    with pytest.raises(UnsupportedOption, match="int8 runs on the CPU only"):
        resolve_precision("int8", cuda)
    with pytest.raises(UnsupportedOption, match="unknown precision 'int4'"):
        resolve_precision("int4", cpu)


@pytest.mark.parametrize("paged_out", [False, True])
def test_freed_memory_stays_for_the_next_call_and_peak_memory_still_sees_it(paged_out):
    """Paged out: what memory pressure does to the kept pages (CI once read 100 MB here): they leave the RSS but stay
    free in glibc's heap, and reusing them faults them back in."""
    if not device_module.reuse_freed_memory():
        pytest.skip("the C library is not glibc 2.33+")
    big = torch.ones(100 * 2**18)  # 100 MB: glibc's default unmaps it when freed
    if paged_out:  # our own pages, dropped before the free; MADV_DONTNEED is 4
        page = 2**12
        first = (big.data_ptr() // page + 1) * page
        assert ctypes.CDLL("libc.so.6").madvise(ctypes.c_void_p(first), ctypes.c_size_t(98 * 2**20), 4) == 0
    del big
    assert device_module.heap_free_bytes() >= 100 * 2**20
    for _ in range(2):
        with device_module.PeakMemory("cpu") as memory:
            block = torch.ones(50 * 2**18)
            time.sleep(0.1)
            del block
        assert 45 * 2**20 < memory.peak_bytes < 70 * 2**20, memory.peak_bytes


def test_free_memory_heeds_a_container_limit(tmp_path):
    assert device_module.container_free_bytes(tmp_path) is None  # no cgroup files: no container limit
    (tmp_path / "memory.max").write_text("max\n")
    (tmp_path / "memory.current").write_text("123\n")
    assert device_module.container_free_bytes(tmp_path) is None
    (tmp_path / "memory.max").write_text(f"{3 * 2**30}\n")
    (tmp_path / "memory.current").write_text(f"{2**30}\n")
    assert device_module.container_free_bytes(tmp_path) == 2 * 2**30
    free = device_module.free_memory_bytes("cpu")
    assert 0 < free <= psutil.virtual_memory().available + device_module.heap_free_bytes() + 2**28


def test_nested_peak_memory_on_cuda_keeps_the_outer_peak(monkeypatch):
    """One CUDA peak counter: the tiler's measurement of its first tile must not hide the app's earlier peak."""
    state = {"allocated": 0, "peak": 0}

    def alloc(n):
        state["allocated"] += n
        state["peak"] = max(state["peak"], state["allocated"])

    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: None)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda device=None: state.update(peak=state["allocated"]))
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: state["allocated"])
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device=None: state["peak"])
    alloc(7)
    with device_module.PeakMemory("cuda") as outer:
        alloc(100), alloc(-100)  # the encoder's peak
        with device_module.PeakMemory(torch.device("cuda", 0)) as inner:
            alloc(30), alloc(-30)
        alloc(50), alloc(-50)
    assert (inner.peak_bytes, outer.peak_bytes) == (30, 100)


def test_int8_is_close_to_fp32_saves_float_weights_and_switches_back(tmp_path):
    pipe = TinySRPipeline(make_student(), make_tiny_vae())
    image = random_image(48, 40)
    ref = pipe(image, tile_size=16, tile_overlap=4).image
    beside = TinySRPipeline(make_student(), make_tiny_vae(), dtype="auto")(image, tile_size=16, tile_overlap=4).image  # int8's float rest
    pipe.to(dtype="int8")
    linears = [m for m in pipe.transformer.modules() if isinstance(m, (torch.nn.Linear, torch.ao.nn.quantized.dynamic.Linear))]
    assert linears and all(isinstance(m, torch.ao.nn.quantized.dynamic.Linear) for m in linears)
    # a copy of the VAE runs in the CPU's faster float; the fp32 models stay for a later switch back
    assert pipe.dtype == {"bf16": torch.bfloat16, "fp32": torch.float32}[resolve_precision("auto", torch.device("cpu"))]
    assert {p.dtype for p in pipe.vae.parameters()} == {pipe.dtype}
    assert all({p.dtype for p in m.parameters()} == {torch.float32} for m in pipe.modules().values())
    out = pipe(image, tile_size=16, tile_overlap=4)
    assert out.dtype == "int8" and psnr(out.image, beside) >= 40 and psnr(out.image, ref) >= 35 and not torch.equal(out.image, beside)
    pipe.save_pretrained(tmp_path / "saved")  # the float weights, while int8 runs
    again = load_pipeline(str(tmp_path / "saved"), dtype="fp32")
    assert torch.equal(again(image, tile_size=16, tile_overlap=4).image, ref)
    assert pipe.num_parameters() == again.num_parameters()
    pipe.to(dtype="fp32")
    assert torch.equal(pipe(image, tile_size=16, tile_overlap=4).image, ref)
    half = pipe.save_pretrained(tmp_path / "fp16", dtype="fp16")  # saving in another precision leaves the model be
    assert torch.equal(pipe(image, tile_size=16, tile_overlap=4).image, ref)
    assert {p.dtype for p in load_pipeline(str(half), dtype="fp32").transformer.parameters()} == {torch.float32}
    assert {v.dtype for v in load_file(half / "transformer" / "diffusion_pytorch_model.safetensors").values()} == {torch.float16}


@pytest.mark.parametrize("amx", [False, True])
def test_int8_packs_for_onednn_where_the_cpu_has_amx_and_leaves_the_engine_as_it_was(monkeypatch, amx):
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
    default = torch.backends.quantized.engine
    expected = "onednn" if amx and "onednn" in torch.backends.quantized.supported_engines else default
    assert int8_engine() == expected
    seen = []
    monkeypatch.setattr(torch.ao.nn.quantized.dynamic.Linear, "from_float", wrap_recording_engine(seen))
    student = make_student()
    image = random_image(48, 40)
    vae = make_tiny_vae()
    ref = TinySRPipeline(student, vae)(image, tile_size=16, tile_overlap=4).image
    quantized = quantize_linears_int8(student)
    assert set(seen) == {expected} and torch.backends.quantized.engine == default
    float_linears = {id(p) for m in student.modules() if isinstance(m, torch.nn.Linear) for p in m.parameters()}
    assert not float_linears & {id(p) for p in quantized.parameters()}  # the copy kept no float linear
    assert not any(isinstance(m, torch.ao.nn.quantized.dynamic.Linear) for m in student.modules())  # the original untouched
    out = TinySRPipeline(quantized, vae)(image, tile_size=16, tile_overlap=4).image
    assert psnr(out, ref) >= 40


def wrap_recording_engine(seen):
    original = torch.ao.nn.quantized.dynamic.Linear.from_float.__func__

    def from_float(cls, *args, **kwargs):
        seen.append(torch.backends.quantized.engine)
        return original(cls, *args, **kwargs)

    return classmethod(from_float)


def test_batched_tiles_and_images_match_one_at_a_time():
    pipe = TinySRPipeline(make_student(), make_tiny_vae())
    images = [random_image(40, 56, seed=0), random_image(24, 20, seed=1), random_image(40, 56, seed=2)]
    options = dict(tile_size=32, tile_overlap=4, vae_tile_size=32, vae_tile_overlap=4)
    single = [pipe(image, **options, tile_batch=1) for image in images]
    calls = {"transformer": [], "encoder": [], "decoder": []}
    for name, module in (("transformer", pipe.transformer), ("encoder", pipe.vae.encoder), ("decoder", pipe.vae.decoder)):
        def record(module, args, kwargs, name=name):
            calls[name].append(len(args[0] if args else kwargs["hidden_states"]))

        module.register_forward_pre_hook(record, with_kwargs=True)
    tiles = pipe(images[0], **options, tile_batch=5)
    assert processing_size(40, 56) == (512, 716) and len(tile_boxes(64, 90, 32, 4, 2)) == 12  # so the first image is 12 tiles
    assert (tiles.image - single[0].image).abs().max() < 1e-5
    # the first tile alone (its peak memory sets the batch), then batches of 5; the CPU's VAEs take tiles one at a time
    assert calls["transformer"] == [1, 5, 5, 1] and calls["encoder"] == calls["decoder"] == [1] * 12
    calls["transformer"].clear()
    pipe.tile_memory_budget = lambda: 1  # not even one tile fits: one at a time, still
    assert torch.equal(pipe(images[0], **options, tile_batch=5).image, single[0].image) and calls["transformer"] == [1] * 12
    del pipe.tile_memory_budget
    batch = pipe.upscale_batch(images, **options, tile_batch=3)
    assert [r.batch_size for r in batch] == [2, 1, 2]
    for one, together in zip(single, batch):
        assert one.image.shape == together.image.shape and (one.image - together.image).abs().max() < 1e-5
    with pytest.raises(ValueError, match="tile_batch >= 1"):
        pipe(images[0], tile_batch=0)


def test_compiled_pipeline_matches_eager():
    """`--compile`: inductor's CPU code gives eager's image (within float reordering); ~20 s of compiling here."""
    pipe = TinySRPipeline(make_student(), make_tiny_vae())
    image = random_image(24, 32)
    eager = pipe(image).image
    assert (pipe.compile()(image).image - eager).abs().max() < 1e-4


def small_table_tinysr():
    """A position table of 8x8 tokens, so 16-latent tiles crop all of it (as the bundled demo's 32-latent tiles do)."""
    torch.manual_seed(0)
    return TinySRPipeline(perturb(TinySRTransformer(**{**TINY_STUDENT, "pos_embed_max_size": 8})), make_tiny_vae())


def small_table_tinysr_with_qk_norm():
    """qk-norm (converted releases may have it): its fp32 q and k meet a bf16 v in the int8 export's attention."""
    torch.manual_seed(0)
    config = {**TINY_STUDENT, "pos_embed_max_size": 8, "qk_norm": "rms_norm"}
    return TinySRPipeline(perturb(TinySRTransformer(**config)), make_tiny_vae())


def small_table_tsdsr():
    pipe = tiny_tsdsr()
    return TSDSRPipeline(make_sd3(pos_embed_max_size=8), pipe.vae, pipe.prompt_embeds, pipe.pooled_embeds)


@pytest.mark.parametrize("make", [small_table_tinysr, small_table_tinysr_with_qk_norm, small_table_tsdsr], ids=["tinysr", "qk-norm", "tsdsr"])
def test_compiled_int8_quantizes_every_linear_and_stays_close_to_fp32(make):
    """int8 + `--compile`: torchao's PT2E int8 linears, lowered by inductor; one export per tile size, any batch."""
    pipe = make()
    images = [random_image(48, 40), random_image(20, 36, seed=3)]
    tiles = [16, 12]  # 16 latent px: the whole position table; 12: a crop of it
    refs = [pipe(image, tile_size=tile, tile_overlap=4).image for image, tile in zip(images, tiles)]
    float_linears = sum(isinstance(m, torch.nn.Linear) for m in pipe.transformer.modules())
    pipe.to(dtype="int8").compile()
    outs = [pipe(image, tile_size=tile, tile_overlap=4) for image, tile in zip(images, tiles)]
    batch = pipe.upscale_batch([images[0], images[0]], tile_size=16, tile_overlap=4)
    for out, ref in zip(outs, refs):
        assert out.dtype == "int8" and 35 <= psnr(out.image, ref) < 100
    assert all(psnr(r.image, outs[0].image) >= 40 for r in batch), [psnr(r.image, outs[0].image) for r in batch]  # per-call scales see the batch
    graphs = [c.model.graph for c in pipe.transformer.compiled.values()]  # the quantized exports inductor compiles, one a tile size
    assert len(graphs) == 2
    for graph in graphs:
        weights = [n for n in graph.nodes if "dequantize_per_channel" in str(n.target)]
        dynamic = [n for n in graph.nodes if "choose_qparams" in str(n.target)]
        assert len(weights) >= float_linears and len(dynamic) >= float_linears // 2  # and the patch embedding; q, k, v share an input
        measured = [n for n in graph.nodes if "measured_attention" in str(n.target)]  # exported inside cpu_attention
        assert bool(measured) == (pipe.dtype != torch.float32)  # its float parts run in bf16 where the CPU has it
    assert {p.dtype for p in pipe.modules()["transformer"].parameters()} == {torch.float32}


def test_compiled_int8_without_torchao_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "torchao.quantization.pt2e", None)
    pipe = TinySRPipeline(make_student(), make_tiny_vae()).to(dtype="int8")
    with pytest.raises(UnsupportedOption, match=r"needs torchao \(pip install torchao=="):
        pipe.compile()


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """Tiny TinySR (through the CLI's main) and TSD-SR exported once each; torch.onnx's export takes ~20-40 s a model here."""
    root = tmp_path_factory.mktemp("onnx")
    pipes = {"tinysr": TinySRPipeline(make_student(), make_tiny_vae()), "tsdsr": tiny_tsdsr()}
    torch_folder = pipes["tinysr"].save_pretrained(root / "torch-tinysr")
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert main(["export-onnx", str(torch_folder), "-o", str(root / "tinysr")]) == 0
    assert "transformer.onnx" in printed.getvalue() and json.loads((root / "tinysr" / "onnx_pipeline.json").read_text())["pipeline"] == "TinySRPipeline"
    # the bundled demo's encoder (pixel_unshuffle) and token-pattern removal
    patch = TinySRPipeline(make_student(), make_tiny_vae(encoder_type="patch"), remove_token_pattern=True)
    exports = {"tinysr": (pipes["tinysr"], root / "tinysr"), "tsdsr": (pipes["tsdsr"], export_onnx(pipes["tsdsr"], root / "tsdsr"))}
    return {**exports, "tinysr-patch-encoder": (patch, export_onnx(patch, root / "tinysr-patch"))}, torch_folder


@pytest.mark.parametrize("name", ["tinysr", "tsdsr", "tinysr-patch-encoder"])
def test_onnx_backend_matches_torch_on_odd_sizes(exported, name):
    pipe, folder = exported[0][name]
    onnx = load_pipeline(str(folder), backend="onnx")
    assert isinstance(onnx, OnnxPipeline) and onnx.num_parameters() == pipe.num_parameters()
    assert onnx.default_color_fix == pipe.default_color_fix and onnx.remove_token_pattern == pipe.remove_token_pattern
    for h, w, tile in [(40, 56, 16), (23, 17, 16), (30, 30, 64)]:  # tiled, smaller than a tile, one whole tile
        image = random_image(h, w, seed=h)
        a, b = pipe(image, tile_size=tile, tile_overlap=4).image, onnx(image, tile_size=tile, tile_overlap=4).image
        assert a.shape == b.shape == (3, 4 * h, 4 * w) and (a - b).abs().max() < 1e-3
    if name == "tsdsr":
        with pytest.raises(UnsupportedOption, match="samples TSD-SR's VAE posterior"):
            onnx(random_image(16, 16), recipe="official")
    elif name == "tinysr":
        with pytest.raises(MissingWeightsError, match="export-onnx"):
            load_pipeline(str(exported[1]), backend="onnx")
    with pytest.raises(UnsupportedOption, match="fp32"):
        OnnxPipeline(folder, dtype="fp16")


def test_cli_upscales_with_onnx_and_int8_in_batches(exported, tmp_path, capsys):
    (pipe, folder), torch_folder = exported[0]["tinysr"], exported[1]
    inputs = tmp_path / "in"
    inputs.mkdir()
    for name, (h, w) in {"a": (40, 48), "b": (40, 48), "c": (28, 20)}.items():
        photo(h, w, seed=len(name) + h).save(inputs / f"{name}.png")
    common = ["--tile", "16", "--tile-overlap", "4", "--batch", "2"]
    r = cli("upscale", inputs, "-o", tmp_path / "onnx", "--backend", "onnx", "--model", folder, *common)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.count("(batch of 2)") == 2 and r.stdout.count("[fp32]") == 3, r.stdout
    for name in "abc":
        expected = pipe(inputs / f"{name}.png", tile_size=16, tile_overlap=4).pil
        a, b = np.asarray(expected, dtype=float), np.asarray(Image.open(tmp_path / "onnx" / f"{name}.png"), dtype=float)
        assert a.shape == b.shape and np.abs(a - b).max() <= 1  # one 8-bit step from float rounding
    r = main_in_process(capsys, "upscale", inputs, "-o", tmp_path / "int8", "--model", torch_folder, "--dtype", "int8", "--tile-batch", "4", *common)
    assert r.returncode == 0 and r.stdout.count("[int8]") == 3 and r.stdout.count("(batch of 2)") == 2, r.stderr[-2000:]
