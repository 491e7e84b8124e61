"""The layer-by-layer UNet: exact against diffusers, cache round trips, ONNX export, user errors."""

from __future__ import annotations

import io
import os
import warnings

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from diffusers import UNet2DConditionModel

from postdiff.exporter.layered_unet import LayeredUNet, LayerPlan, num_branches, xattn_modules
from postdiff.errors import InputError, ModelSourceError
from postdiff.runtime.names import DEEP_FEATURE as FEATURE
from postdiff.runtime.names import xattn_tensor_name

os.environ.setdefault("HF_HUB_OFFLINE", "1")

TOLERANCE = 1e-5
CONTEXT_LEN = 7

TINY = dict(
    sample_size=16, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=32, attention_head_dim=4, norm_num_groups=8,
)
# Three blocks, two layers each: 9 skips, cross-attention at two resolutions, two upsamplers.
THREE = dict(
    sample_size=16, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(16, 32, 32),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=32, attention_head_dim=4, norm_num_groups=8,
)


def make_unet(**config: object) -> UNet2DConditionModel:
    torch.manual_seed(0)
    return UNet2DConditionModel(**config).eval().requires_grad_(False)


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny() -> UNet2DConditionModel:
    return make_unet(**TINY)


@pytest.fixture(scope="module")
def three() -> UNet2DConditionModel:
    return make_unet(**THREE)


@pytest.fixture(scope="module")
def unets(tiny: UNet2DConditionModel, three: UNet2DConditionModel) -> dict[str, UNet2DConditionModel]:
    return {"tiny": tiny, "three": three}


def inputs(batch: int, height: int, width: int, seed: int = 0) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {
        "sample": torch.randn(batch, 4, height, width, generator=generator),
        "timestep": torch.tensor([981.0, 17.0][:batch] + [500.0] * max(0, batch - 2)),
        "encoder_hidden_states": torch.randn(batch, CONTEXT_LEN, 32, generator=generator),
    }


def diffusers_out(unet: UNet2DConditionModel, feed: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        return unet(feed["sample"], feed["timestep"], feed["encoder_hidden_states"]).sample


def run(unet: UNet2DConditionModel, plan: LayerPlan, feed: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Run ``plan`` on the tensors of ``feed`` it takes (by name); outputs by name."""
    model = LayeredUNet(unet, plan)
    with torch.no_grad():
        outs = model(*(feed[name] for name in model.input_names))
    assert len(outs) == len(model.output_names)
    return dict(zip(model.output_names, outs))


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max())


# -- exactness ---------------------------------------------------------------------------------


@pytest.mark.parametrize("name,batch,side", [("tiny", 1, 16), ("tiny", 2, 16), ("tiny", 2, 8), ("three", 2, 16)])
def test_full_matches_diffusers(unets, name: str, batch: int, side: int) -> None:
    unet = unets[name]
    feed = inputs(batch, side, side)
    out = run(unet, LayerPlan(), feed)
    assert list(out) == ["noise_pred"]
    assert max_diff(out["noise_pred"], diffusers_out(unet, feed)) <= TOLERANCE


@pytest.mark.parametrize("name,side", [("tiny", 16), ("tiny", 8), ("three", 16)])
def test_every_branch_reproduces_full_from_its_own_feature(unets, name: str, side: int) -> None:
    unet = unets[name]
    feed = inputs(2, side, side)
    reference = diffusers_out(unet, feed)
    count = num_branches(unet)
    assert count == {"tiny": 4, "three": 9}[name]
    for branch in range(count):
        written = run(unet, LayerPlan(deep="write", branch=branch), feed)
        assert list(written) == ["noise_pred", FEATURE]
        assert max_diff(written["noise_pred"], reference) <= TOLERANCE
        shallow = run(unet, LayerPlan(deep="read", branch=branch), {**feed, **written})
        assert max_diff(shallow["noise_pred"], reference) <= TOLERANCE, f"branch {branch}"


def test_branch_features_sit_where_deepcache_puts_them(tiny) -> None:
    """Tiny UNet skips: conv_in (16x16), down0 layer (16x16), downsampler (8x8), down1 layer (8x8). The
    feature of branch 3 is the mid block output; 2: up0's first layer output (64 ch); 1: up0's
    upsampled output (64 ch, 16x16); 0: up1's first layer output (32 ch)."""
    feed = inputs(1, 16, 16)
    features = [run(tiny, LayerPlan("write", b), feed)[FEATURE] for b in range(4)]
    assert [tuple(f.shape) for f in features] == [(1, 32, 16, 16), (1, 64, 16, 16), (1, 64, 8, 8), (1, 64, 8, 8)]
    context = feed["encoder_hidden_states"]
    with torch.no_grad():
        emb = tiny.time_embedding(tiny.time_proj(feed["timestep"]))
        h = tiny.down_blocks[0](tiny.conv_in(feed["sample"]), emb, encoder_hidden_states=context)[0]
        mid = tiny.mid_block(tiny.down_blocks[1](h, emb)[0], emb, encoder_hidden_states=context)
    assert max_diff(features[3], mid) <= TOLERANCE


def test_xattn_write_then_read_reproduces_full(unets) -> None:
    for unet in unets.values():
        feed = inputs(2, 16, 16)
        reference = diffusers_out(unet, feed)
        names = xattn_modules(unet, LayerPlan())
        every_attn2 = [name for name, _ in unet.named_modules() if name.endswith(".attn2")]
        assert sorted(names) == sorted(every_attn2)
        written = run(unet, LayerPlan(xattn="write"), feed)
        assert list(written) == ["noise_pred", *map(xattn_tensor_name, names)]
        assert max_diff(written["noise_pred"], reference) <= TOLERANCE
        model = LayeredUNet(unet, LayerPlan(xattn="read"))
        assert "encoder_hidden_states" not in model.input_names
        read = run(unet, LayerPlan(xattn="read"), {**feed, **written})
        assert max_diff(read["noise_pred"], reference) <= TOLERANCE


def test_xattn_order_is_execution_order(tiny) -> None:
    assert xattn_modules(tiny, LayerPlan()) == [
        "down_blocks.0.attentions.0.transformer_blocks.0.attn2",
        "mid_block.attentions.0.transformer_blocks.0.attn2",
        "up_blocks.1.attentions.0.transformer_blocks.0.attn2",
        "up_blocks.1.attentions.1.transformer_blocks.0.attn2",
    ]
    assert xattn_modules(tiny, LayerPlan("write", 2)) == xattn_modules(tiny, LayerPlan())


def test_shallow_with_xattn_read_uses_only_shallow_modules(unets) -> None:
    for unet in unets.values():
        feed = inputs(2, 16, 16)
        reference = diffusers_out(unet, feed)
        every = xattn_modules(unet, LayerPlan())
        written = {b: run(unet, LayerPlan("write", b, "write"), feed) for b in range(num_branches(unet))}
        for branch, outs in written.items():
            shallow = xattn_modules(unet, LayerPlan("read", branch))
            # A subsequence of the full list, never from the skipped deep part.
            assert shallow == [name for name in every if name in shallow]
            assert not any(name.startswith("mid_block") for name in shallow)
            model = LayeredUNet(unet, LayerPlan("read", branch, "read"))
            assert model.input_names == ["sample", "timestep", FEATURE, *map(xattn_tensor_name, shallow)]
            read = run(unet, LayerPlan("read", branch, "read"), {**feed, **outs})
            assert max_diff(read["noise_pred"], reference) <= TOLERANCE, f"branch {branch}"
    assert xattn_modules(unets["tiny"], LayerPlan("read", 0)) == ["up_blocks.1.attentions.1.transformer_blocks.0.attn2"]


def test_example_inputs_have_the_shapes_write_graphs_emit(three) -> None:
    feed = inputs(2, 16, 8)
    for branch in range(num_branches(three)):
        emitted = run(three, LayerPlan("write", branch, "write"), feed)
        for xattn in ("none", "read"):
            model = LayeredUNet(three, LayerPlan("read", branch, xattn))
            example = model.example_inputs(2, 16, 8, CONTEXT_LEN, torch.Generator().manual_seed(0))
            for name, tensor in zip(model.input_names, example):
                if name in emitted:
                    assert tensor.shape == emitted[name].shape, (branch, name)
            assert example[1].dtype == torch.float32 and example[1].shape == (2,)


def test_forward_leaves_the_unet_unchanged(tiny) -> None:
    before = dict(tiny.attn_processors)
    feed = inputs(1, 16, 16)
    written = run(tiny, LayerPlan("write", 1, "write"), feed)
    run(tiny, LayerPlan("read", 1, "read"), {**feed, **written})
    after = tiny.attn_processors
    assert all(after[name] is processor for name, processor in before.items())


# -- ONNX --------------------------------------------------------------------------------------

ONNX_PLANS = [
    LayerPlan(), LayerPlan("write", 1), LayerPlan("read", 0), LayerPlan("read", 1),
    LayerPlan(xattn="write"), LayerPlan(xattn="read"), LayerPlan("read", 1, "read"),
]


def export(model: LayeredUNet, example: tuple[torch.Tensor, ...]) -> onnx.ModelProto:
    buffer = io.BytesIO()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # tracer warnings about Python-level shape checks
        torch.onnx.export(model, example, buffer, dynamo=False, opset_version=17,
                          input_names=model.input_names, output_names=model.output_names)
    return onnx.load_from_string(buffer.getvalue())


def session(graph: onnx.ModelProto) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.log_severity_level = 3
    return ort.InferenceSession(graph.SerializeToString(), options, providers=["CPUExecutionProvider"])


@pytest.fixture(scope="module")
def tiny_graphs(tiny) -> dict[LayerPlan, tuple[LayeredUNet, onnx.ModelProto]]:
    graphs = {}
    for plan in ONNX_PLANS + [LayerPlan("write", 1, "write")]:
        model = LayeredUNet(tiny, plan)
        example = model.example_inputs(2, 16, 16, CONTEXT_LEN, torch.Generator().manual_seed(1))
        graphs[plan] = model, export(model, example)
    return graphs


@pytest.mark.parametrize("plan", ONNX_PLANS, ids=str)
def test_onnx_matches_torch(tiny_graphs, plan: LayerPlan) -> None:
    model, graph = tiny_graphs[plan]
    assert [i.name for i in graph.graph.input] == model.input_names
    assert [o.name for o in graph.graph.output] == model.output_names
    if plan.xattn == "read":
        assert "encoder_hidden_states" not in [i.name for i in graph.graph.input]
    example = model.example_inputs(2, 16, 16, CONTEXT_LEN, torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = model(*example)
    actual = session(graph).run(None, {name: t.numpy() for name, t in zip(model.input_names, example)})
    for name, want, got in zip(model.output_names, expected, actual):
        assert float(np.abs(got - want.numpy()).max()) <= TOLERANCE, name


def test_onnx_refresh_then_reuse_matches_diffusers(tiny, tiny_graphs) -> None:
    """Runtime-style chaining: the write graph's cache outputs feed the shallow xattn-read graph."""
    feed = {k: v.numpy() for k, v in inputs(2, 16, 16, seed=3).items()}
    write_model, write_graph = tiny_graphs[LayerPlan("write", 1, "write")]
    read_model, read_graph = tiny_graphs[LayerPlan("read", 1, "read")]
    written = dict(zip(write_model.output_names, session(write_graph).run(None, feed)))
    reused = session(read_graph).run(None, {n: {**feed, **written}[n] for n in read_model.input_names})[0]
    reference = diffusers_out(tiny, {k: torch.from_numpy(v) for k, v in feed.items()}).numpy()
    assert float(np.abs(written["noise_pred"] - reference).max()) <= TOLERANCE
    assert float(np.abs(reused - reference).max()) <= TOLERANCE


# -- errors ------------------------------------------------------------------------------------


def test_bad_branch_names_the_valid_range(tiny) -> None:
    for plan in (LayerPlan("read", 4), LayerPlan("write", 99)):
        with pytest.raises(InputError, match=r"0\.\.3"):
            LayeredUNet(tiny, plan)
        with pytest.raises(InputError, match=r"0\.\.3"):
            xattn_modules(tiny, plan)
    for branch in (-1, True, 1.0):
        with pytest.raises(InputError, match="branch"):
            LayerPlan("read", branch)  # type: ignore[arg-type]


@pytest.mark.parametrize("kwargs", [dict(deep="cache"), dict(deep="READ"), dict(xattn="r"), dict(xattn=None)])
def test_bad_mode_strings(kwargs) -> None:
    with pytest.raises(InputError, match="expected one of"):
        LayerPlan(**kwargs)


def test_bad_inputs_at_forward(tiny) -> None:
    model = LayeredUNet(tiny, LayerPlan("read", 1))
    example = model.example_inputs(1, 16, 16, CONTEXT_LEN, torch.Generator().manual_seed(0))
    with pytest.raises(InputError, match="expected 4"):
        model(*example[:3])
    with pytest.raises(InputError, match=FEATURE):
        model(example[0], example[1], example[2], example[3][:, :, :8])
    with pytest.raises(InputError, match="grid"):
        model(torch.randn(1, 4, 15, 16), *example[1:])
    with pytest.raises(InputError, match="grid"):
        model.example_inputs(1, 15, 16, CONTEXT_LEN, torch.Generator())


@pytest.mark.parametrize("change", [
    dict(down_block_types=("SimpleCrossAttnDownBlock2D", "DownBlock2D"),
         up_block_types=("UpBlock2D", "SimpleCrossAttnUpBlock2D")),
    dict(num_class_embeds=10),
    dict(addition_embed_type="text"),  # only SDXL's "text_time" addition embedding is ported
], ids=["block-type", "class-embedding", "text-addition"])
def test_unsupported_unets_are_rejected(change) -> None:
    unet = make_unet(**{**TINY, **change})
    with pytest.raises(ModelSourceError, match="SD|Stable Diffusion"):
        LayeredUNet(unet, LayerPlan())
    with pytest.raises(ModelSourceError):
        num_branches(unet)


def test_freeu_is_rejected(tiny) -> None:
    tiny.enable_freeu(s1=0.9, s2=0.2, b1=1.2, b2=1.4)
    try:
        with pytest.raises(ModelSourceError, match="disable_freeu"):
            LayeredUNet(tiny, LayerPlan())
    finally:
        tiny.disable_freeu()
