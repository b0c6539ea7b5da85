"""Vision path: MiniCPM-V slicing, NaViT positions, SigLIP encoder and the Perceiver resampler (tiny preset)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image

from workers.model.image import common_source_grids, patch_grid, plan_slices, slice_count, slice_image
from workers.model.presets import FULL, TINY
from workers.model.resampler import Resampler, sincos_pos_table_2d
from workers.model.vpm import SiglipVisionTransformer, navit_position_ids


def camera_frame(width: int, height: int, mode: str = "RGB") -> Image.Image:
    rng = np.random.default_rng(width * height)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8), "RGB").convert(mode)


@pytest.fixture(scope="module")
def vpm() -> SiglipVisionTransformer:
    torch.manual_seed(0)
    model = SiglipVisionTransformer(TINY.vision)
    model.init_weights()
    return model.eval()


@pytest.fixture(scope="module")
def resampler() -> Resampler:
    torch.manual_seed(1)
    model = Resampler(TINY.resampler)
    model.init_weights()
    return model.eval()


def test_single_image_resize_640x480() -> None:
    images = slice_image(camera_frame(640, 480), 1, TINY.vision)
    assert len(images) == 1
    channels, height, width = images[0].shape
    assert channels == 3 and height % 14 == 0 and width % 14 == 0
    assert (height, width) == (392, 518)  # 28 x 37 patches
    assert abs(height * width / 448**2 - 1) < 0.05
    assert abs(math.log((width / height) / (640 / 480))) < 0.02
    assert images[0].dtype == torch.float32
    assert -1.0 <= images[0].min() and images[0].max() <= 1.0


def test_hd_mode_gives_source_and_two_slices() -> None:
    images = slice_image(camera_frame(640, 480), 2, TINY.vision)
    assert [tuple(img.shape) for img in images] == [(3, 392, 518), (3, 546, 364), (3, 546, 364)]
    plan = plan_slices(640, 480, 2, TINY.vision)
    assert plan.grid == (2, 1)  # two columns, one row: nearest to 4:3 among 1x2 and 2x1


def test_slices_are_row_major_crops_of_the_refined_image() -> None:
    frame = camera_frame(1200, 300)  # wide: area ratio 1.79 -> 2 slices side by side
    images = slice_image(frame, 2, TINY.vision)
    plan = plan_slices(1200, 300, 2, TINY.vision)
    refined = frame.resize(plan.refine_size, Image.Resampling.BICUBIC)
    left = (np.asarray(refined, dtype=np.float32)[:, : plan.refine_size[0] // 2] / 255 - 0.5) / 0.5
    assert torch.allclose(images[1], torch.from_numpy(left).permute(2, 0, 1))


def test_grayscale_and_rgba_are_converted_to_rgb() -> None:
    for mode in ("L", "RGBA"):
        assert slice_image(camera_frame(320, 240, mode), 1, TINY.vision)[0].shape == (3, 392, 518)


def test_small_image_is_upscaled_not_sliced() -> None:
    assert len(slice_image(camera_frame(320, 240), 9, TINY.vision)) == 1


def test_common_camera_frames_map_to_few_grids() -> None:
    sizes = [(640, 480), (1280, 960), (1024, 768), (1920, 1080), (1280, 720), (1366, 768), (854, 480),
             (720, 720), (1080, 1080), (480, 640), (720, 1280), (1079, 1920)]
    grids = {patch_grid(slice_image(camera_frame(w, h), 1, TINY.vision)[0], TINY.vision) for w, h in sizes}
    assert grids == set(common_source_grids(TINY.vision))
    assert common_source_grids(TINY.vision) == [(32, 32), (28, 37), (37, 28), (24, 43), (43, 24)]


def test_navit_position_ids_known_grids() -> None:
    assert navit_position_ids(2, 3, 70).tolist() == [0, 23, 46, 2450, 2473, 2496]
    assert torch.equal(navit_position_ids(70, 70, 70), torch.arange(4900))
    ids = navit_position_ids(28, 37, 70).view(28, 37)
    assert ids[1, 0].item() == 2 * 70 and ids[0, 1].item() == 1 and ids[27, 36].item() == 67 * 70 + 68
    # float32 arange as in the reference: the exact tie 15/25 = 42/70 falls in bucket 41
    assert navit_position_ids(25, 1, 70)[15].item() == 41 * 70


def test_vpm_checkpoint_names_and_layers(vpm: SiglipVisionTransformer) -> None:
    shapes = {name: tuple(p.shape) for name, p in vpm.state_dict().items()}
    hidden, ffn = TINY.vision.hidden, TINY.vision.ffn
    assert shapes["embeddings.patch_embedding.weight"] == (hidden, 3, 14, 14)
    assert shapes["embeddings.patch_embedding.bias"] == (hidden,)
    assert shapes["embeddings.position_embedding.weight"] == (4900, hidden)
    for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
        assert shapes[f"encoder.layers.1.self_attn.{proj}.weight"] == (hidden, hidden)
        assert shapes[f"encoder.layers.1.self_attn.{proj}.bias"] == (hidden,)
    assert shapes["encoder.layers.0.mlp.fc1.weight"] == (ffn, hidden)
    assert shapes["encoder.layers.0.mlp.fc2.weight"] == (hidden, ffn)
    for norm in ("encoder.layers.0.layer_norm1", "encoder.layers.0.layer_norm2", "post_layernorm"):
        assert shapes[f"{norm}.weight"] == shapes[f"{norm}.bias"] == (hidden,)
    assert not any(name.startswith(f"encoder.layers.{TINY.vision.layers_run}.") for name in shapes)
    assert len(vpm.encoder.layers) == TINY.vision.layers_run == 2


def test_vpm_forward_shapes_and_dtypes(vpm: SiglipVisionTransformer) -> None:
    pixels = torch.stack(slice_image(camera_frame(640, 480), 2, TINY.vision)[1:])
    out = vpm(pixels)
    assert out.shape == (2, 39 * 26, TINY.vision.hidden) and out.dtype == torch.float32
    assert torch.isfinite(out).all()
    single = vpm(pixels[1:])
    assert torch.allclose(single[0], out[1], atol=1e-5)  # batch entries are independent
    bf16 = SiglipVisionTransformer(TINY.vision)
    bf16.load_state_dict(vpm.state_dict())
    out_bf16 = bf16.to(torch.bfloat16)(pixels)
    assert out_bf16.dtype == torch.bfloat16
    assert (out_bf16.float() - out).abs().mean() < 0.1


def test_vpm_position_embedding_follows_navit_ids(vpm: SiglipVisionTransformer) -> None:
    pixels = torch.zeros(1, 3, 28, 42)  # 2 x 3 patches, zero image -> embedding = conv bias + positions
    embeddings = vpm.embeddings(pixels)[0]
    expected = vpm.embeddings.position_embedding.weight[navit_position_ids(2, 3, 70)]
    assert torch.allclose(embeddings, expected + vpm.embeddings.patch_embedding.bias, atol=1e-6)


def test_resampler_names_shapes_and_forward(resampler: Resampler, vpm: SiglipVisionTransformer) -> None:
    shapes = {name: tuple(p.shape) for name, p in resampler.state_dict().items()}
    embed, kv_dim = TINY.resampler.embed_dim, TINY.resampler.kv_dim
    assert shapes == {
        "query": (64, embed), "kv_proj.weight": (embed, kv_dim), "proj": (embed, embed),
        "attn.in_proj_weight": (3 * embed, embed), "attn.in_proj_bias": (3 * embed,),
        "attn.out_proj.weight": (embed, embed), "attn.out_proj.bias": (embed,),
        "ln_q.weight": (embed,), "ln_q.bias": (embed,), "ln_kv.weight": (embed,), "ln_kv.bias": (embed,),
        "ln_post.weight": (embed,), "ln_post.bias": (embed,),
    }
    image = slice_image(camera_frame(640, 480), 1, TINY.vision)[0]
    out = resampler(vpm(image[None]), patch_grid(image, TINY.vision))
    assert out.shape == (1, 64, embed) and torch.isfinite(out).all()


def test_resampler_attention_matches_torch_multihead(resampler: Resampler) -> None:
    reference = torch.nn.MultiheadAttention(TINY.resampler.embed_dim, TINY.resampler.heads, batch_first=True)
    reference.load_state_dict({k.removeprefix("attn."): v for k, v in resampler.state_dict().items()
                               if k.startswith("attn.")})
    query, key, value = (torch.randn(2, n, TINY.resampler.embed_dim) for n in (64, 50, 50))
    with torch.no_grad():
        expected = reference(query, key, value, need_weights=False)[0]
        assert torch.allclose(resampler.attn(query, key, value), expected, atol=1e-5)


def test_resampler_matches_formula(resampler: Resampler) -> None:
    rows, cols = 3, 5
    x = torch.randn(2, rows * cols, TINY.resampler.kv_dim)
    with torch.no_grad():
        kv = resampler.ln_kv(resampler.kv_proj(x))
        pos = sincos_pos_table_2d(TINY.resampler.embed_dim, rows, cols).reshape(rows * cols, -1)
        query = resampler.ln_q(resampler.query).expand(2, -1, -1)
        expected = resampler.ln_post(resampler.attn(query, kv + pos, kv)) @ resampler.proj
        assert torch.allclose(resampler(x, (rows, cols)), expected, atol=1e-5)


def test_sincos_table_layout_and_growth() -> None:
    table = sincos_pos_table_2d(8, 4, 6)  # quarter = 2: omega = [1, 1e-2]
    i, j = 3, 5
    expected = [math.sin(j), math.sin(j * 0.01), math.cos(j), math.cos(j * 0.01),
                math.sin(i), math.sin(i * 0.01), math.cos(i), math.cos(i * 0.01)]
    assert torch.allclose(table[i, j], torch.tensor(expected), atol=1e-6)
    model = Resampler(TINY.resampler)
    model.init_weights()
    assert model.pos_table.shape[:2] == (70, 70)
    out = model(torch.randn(1, 80 * 10, TINY.resampler.kv_dim), (80, 10))
    assert out.shape == (1, 64, TINY.resampler.embed_dim) and model.pos_table.shape[:2] == (80, 70)
    assert "pos_table" not in model.state_dict()


def test_full_size_parameter_counts_on_meta() -> None:
    with torch.device("meta"):
        vpm = SiglipVisionTransformer(FULL.vision)
        resampler = Resampler(FULL.resampler)
    vpm_params = sum(p.numel() for p in vpm.parameters())
    assert len(vpm.encoder.layers) == 26
    assert abs(vpm_params / 0.40e9 - 1) < 0.02
    assert abs(sum(p.numel() for p in resampler.parameters()) / 0.089e9 - 1) < 0.02
    assert vpm.embeddings.position_embedding.weight.is_meta


def test_fixed_grid_compiles_without_recompiles(vpm: SiglipVisionTransformer, resampler: Resampler) -> None:
    torch._dynamo.reset()
    compiled_vpm = torch.compile(vpm, backend="eager")
    compiled_resampler = torch.compile(resampler, backend="eager", fullgraph=True)
    with torch.no_grad(), torch._dynamo.config.patch(error_on_recompile=True):
        for _ in range(2):  # a second frame of the same grid must reuse the graphs
            pixels = torch.randn(1, 3, 392, 518)
            features = compiled_vpm(pixels)
            assert torch.allclose(features, vpm(pixels), atol=1e-5)
            out = compiled_resampler(features, (28, 37))
            assert torch.allclose(out, resampler(features, (28, 37)), atol=1e-5)


@pytest.mark.parametrize("size", [(640, 480), (1920, 1080), (448, 336), (300, 900), (4000, 3000)])
def test_slice_count_predicts_slice_image_without_resizing(size: tuple[int, int]) -> None:
    """The session sizes its prefill with slice_count while slice_image runs on the frame thread."""
    frame = camera_frame(*size)
    for max_slice_nums in (1, 2, 4, 9):
        assert slice_count(frame, max_slice_nums, TINY.vision) == len(slice_image(frame, max_slice_nums, TINY.vision))
