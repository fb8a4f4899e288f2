"""Step Rehash: the deep part runs only at full steps, caches reset between generations,
threshold mode decides from measured feature distance, and the final-latent difference to
the full loop is reported (Step Rehash changes results on purpose)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import memopt
import zoo
from memopt.diffusion import StepRehash


class Down(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, hidden_states, temb):
        h = F.silu(self.conv(hidden_states) + temb)
        return F.avg_pool2d(h, 2), (h,)


class Up(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.resnets = nn.ModuleList([nn.Conv2d(2 * channels, channels, 3, padding=1)])

    def forward(self, hidden_states, res_hidden_states_tuple, temb):
        h = F.interpolate(hidden_states, scale_factor=2.0)
        return F.silu(self.resnets[0](torch.cat([h, res_hidden_states_tuple[-1]], 1)) + temb)


class Mid(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, hidden_states, temb, encoder_hidden_states=None):
        prompt = 0 if encoder_hidden_states is None else encoder_hidden_states.mean()  # the deep part reads it
        return hidden_states + torch.tanh(self.conv(hidden_states) + temb + prompt)


class ToyUNet(nn.Module):
    """The block layout and calling convention of diffusers' UNets, in a few lines."""

    def __init__(self, channels: int = 8) -> None:
        super().__init__()
        self.config = SimpleNamespace(in_channels=3)
        self.conv_in = nn.Conv2d(3, channels, 3, padding=1)
        self.down_blocks = nn.ModuleList([Down(channels), Down(channels)])
        self.mid_block = Mid(channels)
        self.up_blocks = nn.ModuleList([Up(channels), Up(channels)])
        self.conv_out = nn.Conv2d(channels, 3, 3, padding=1)

    def forward(self, sample, timestep, encoder_hidden_states=None, return_dict=True):
        temb = torch.as_tensor(timestep, dtype=sample.dtype).reshape(-1)[:1].view(1, 1, 1, 1) / 1000
        h = self.conv_in(sample)
        skips = ()
        for block in self.down_blocks:
            h, res = block(hidden_states=h, temb=temb)
            skips += res
        h = self.mid_block(h, temb, encoder_hidden_states)
        for block in self.up_blocks:
            res, skips = skips[-len(block.resnets):], skips[: -len(block.resnets)]
            h = block(hidden_states=h, res_hidden_states_tuple=res, temb=temb)
        out = self.conv_out(h)
        return (out,) if not return_dict else SimpleNamespace(sample=out)


def count_calls(module: nn.Module) -> list[int]:
    calls = [0]
    module.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    return calls


def denoise(unet, latents, timesteps):
    """A minimal sampler loop with the pipelines' calling convention."""
    for t in timesteps:
        noise = unet(latents, t, encoder_hidden_states=None, return_dict=False)[0]
        latents = latents - 0.05 * noise
    return latents


TIMESTEPS = [torch.tensor(t) for t in (900, 800, 700, 600, 500, 400, 300, 200, 100)]


def test_options_are_validated():
    with pytest.raises(ValueError, match="exactly one of 'interval' and 'threshold'"):
        StepRehash(ToyUNet())
    with pytest.raises(ValueError, match="interval"):
        memopt.Config(step_rehash={"interval": 1})
    with pytest.raises(ValueError, match="valid keys are: interval, threshold, depth"):
        memopt.Config(step_rehash={"every": 2})
    with pytest.raises(ValueError, match="depth must be in"):
        StepRehash(ToyUNet(), interval=2, depth=2)
    with pytest.raises(ValueError, match="down_blocks"):
        StepRehash(nn.Linear(2, 2), interval=2)


def test_interval_skips_the_deep_part_and_resets_between_generations():
    torch.manual_seed(0)
    unet = ToyUNet().eval()
    deep_calls, shallow_calls = count_calls(unet.mid_block), count_calls(unet.down_blocks[0])
    rehash = StepRehash(unet, interval=3)
    latents = torch.randn(1, 3, 16, 16)
    with torch.no_grad():
        denoise(rehash, latents, TIMESTEPS)
        assert deep_calls[0] == 3  # steps 0, 3, 6 of 9
        assert shallow_calls[0] == 10  # and once more to check the shrunk cache after step 0
        assert [record.full for record in rehash.history] == [True, False, False] * 3
        denoise(rehash, latents, TIMESTEPS)  # timesteps go up again: a new generation
    assert rehash.generations == 2
    assert deep_calls[0] == 6
    assert rehash.history[9].full  # the second generation starts with a full step
    # The wrapper leaves the UNet as it found it and stands in for it.
    assert isinstance(unet.mid_block, Mid) and isinstance(unet.down_blocks[1], Down)
    assert rehash.config.in_channels == 3


def test_a_batch_that_changes_gets_a_full_step():
    """A pipeline that stops classifier-free guidance part way halves its batch: the deep
    features cached for the larger batch cannot serve it, whatever the interval says."""
    torch.manual_seed(0)
    unet = ToyUNet().eval()
    rehash = StepRehash(unet, interval=3)
    latents = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        rehash(latents, TIMESTEPS[0])
        halved = rehash(latents[:1], TIMESTEPS[1], return_dict=False)[0]
        assert [record.full for record in rehash.history] == [True, True]
        torch.testing.assert_close(halved, unet(latents[:1], TIMESTEPS[1], return_dict=False)[0], rtol=0, atol=0)
        rehash(latents[:1], TIMESTEPS[2])
    assert [record.full for record in rehash.history] == [True, True, False]  # the interval resumes


def test_a_generation_starting_at_the_last_ones_timestep_is_new():
    """Schedules whose every generation starts at the same timestep ("trailing" spacing):
    after a one-step generation, the next one starts at the timestep the last call had. On
    other latents that is a new generation, not a second call of the old step (whose deep
    features the next step would then reuse)."""
    torch.manual_seed(0)
    unet = ToyUNet().eval()
    timesteps = [torch.tensor(t) for t in (999, 666, 333)]
    first, second = torch.randn(1, 3, 16, 16), torch.randn(1, 3, 16, 16)
    rehash = StepRehash(unet, interval=3)
    with torch.no_grad():
        denoise(rehash, first, timesteps[:1])
        reused = denoise(rehash, second, timesteps)
        fresh = denoise(StepRehash(unet, interval=3), second, timesteps)
    assert rehash.generations == 2
    assert [record.full for record in rehash.history] == [True, True, False, False]
    torch.testing.assert_close(reused, fresh, rtol=0, atol=0)


def test_guidance_passes_as_separate_calls_share_a_step():
    """Pipelines that call the UNet once per guidance pass: the same timestep and latents
    are two calls of one step, each with its own cache."""
    torch.manual_seed(0)
    unet = ToyUNet().eval()
    deep_calls = count_calls(unet.mid_block)
    rehash = StepRehash(unet, interval=2)
    latents, prompts = torch.randn(1, 3, 16, 16), [torch.randn(1, 4, 8), torch.zeros(1, 4, 8)]
    with torch.no_grad():
        for t in TIMESTEPS[:4]:
            noise = [rehash(latents, t, encoder_hidden_states=prompt, return_dict=False)[0] for prompt in prompts]
            latents = latents - 0.05 * (noise[0] + noise[1])
    assert rehash.generations == 1
    assert [record.full for record in rehash.history] == [True, True, False, False] * 2
    assert deep_calls[0] == 4


def test_a_cache_made_under_another_prompt_is_never_reused():
    """After a one-step generation, the same seed (latents) with another prompt starts at the
    same timestep. Its first call looks like a second guidance pass of the old step (the same
    latents, new conditioning), but no step may reuse deep features cached under the old
    prompt: the next step is full. And calling the same thing again and again is one
    generation after another, not ever more calls of one step (each with a cache)."""
    torch.manual_seed(0)
    unet = ToyUNet().eval()
    timesteps = [torch.tensor(t) for t in (999, 666, 333)]
    latents, old_prompt, new_prompt = torch.randn(1, 3, 16, 16), torch.randn(1, 4, 8), torch.randn(1, 4, 8)

    def generate(model, prompt, x, steps):
        for t in steps:
            x = x - 0.05 * model(x, t, encoder_hidden_states=prompt, return_dict=False)[0]
        return x

    rehash = StepRehash(unet, interval=3)
    with torch.no_grad():
        generate(rehash, old_prompt, latents, timesteps[:1])
        reused = generate(rehash, new_prompt, latents, timesteps)
        # What it must equal: full steps at 999 and 666 under the new prompt, then a rehash
        # step from the 666 step's cache.
        first = generate(unet, new_prompt, latents, timesteps[:1])
        expected = generate(StepRehash(unet, interval=3), new_prompt, first, timesteps[1:])
        assert [record.full for record in rehash.history] == [True, True, True, False]
        torch.testing.assert_close(reused, expected, rtol=0, atol=0)
        for _ in range(4):
            generate(rehash, new_prompt, latents, timesteps[:1])
    assert rehash.generations == 5
    assert list(rehash._caches) == [0]


def test_a_second_order_samplers_repeated_timesteps_stay_in_one_generation():
    """Heun-style schedules evaluate each timestep after the first twice, on other latents."""
    unet = ToyUNet().eval()
    rehash = StepRehash(unet, interval=2)
    with torch.no_grad():
        denoise(rehash, torch.randn(1, 3, 16, 16), [TIMESTEPS[0], *[t for t in TIMESTEPS[1:3] for _ in range(2)]])
    assert rehash.generations == 1
    # Second evaluations are a step's second call, with a cache of their own: full at first.
    assert [record.full for record in rehash.history] == [True, False, True, True, True]


def test_compile_options_are_validated_at_construction():
    with pytest.raises(ValueError, match="unknown memopt option.*'lowring'"):
        StepRehash(ToyUNet(), interval=2, compile_options={"lowring": "eager"})


def test_threshold_rehashes_only_close_features():
    torch.manual_seed(1)
    unet = ToyUNet().eval()
    deep_calls = count_calls(unet.mid_block)
    latents = torch.randn(1, 3, 16, 16)
    with torch.no_grad():
        strict = StepRehash(unet, threshold=1e-9)
        denoise(strict, latents, TIMESTEPS)
        assert deep_calls[0] == len(TIMESTEPS)  # features always move more than 1e-9
        assert all(record.distance > 1e-9 for record in strict.history[1:])
        loose = StepRehash(unet, threshold=1e9)
        denoise(loose, latents, TIMESTEPS)
    assert deep_calls[0] == len(TIMESTEPS) + 1  # only the first step of the generation
    assert loose.rehash_steps == len(TIMESTEPS) - 1


def test_rehash_output_equals_full_run_at_full_steps_and_differs_between():
    torch.manual_seed(2)
    unet = ToyUNet().eval()
    rehash = StepRehash(unet, interval=2)
    latents = torch.randn(1, 3, 16, 16)
    with torch.no_grad():
        full0 = unet(latents, TIMESTEPS[0], return_dict=False)[0]
        torch.testing.assert_close(rehash(latents, TIMESTEPS[0], return_dict=False)[0], full0, rtol=0, atol=0)
        moved = latents + 0.1 * torch.randn_like(latents)
        reused = rehash(moved, TIMESTEPS[1], return_dict=False)[0]
        fresh = unet(moved, TIMESTEPS[1], return_dict=False)[0]
    assert not torch.equal(reused, fresh)
    assert rehash.history[1].full is False


def test_memopt_compile_applies_step_rehash_and_the_backend_rejects_it():
    torch.manual_seed(3)
    unet = ToyUNet().eval()
    torch._dynamo.reset()
    wrapped = memopt.compile(unet, step_rehash={"interval": 2}, lowering="eager", slicing=False)
    assert isinstance(wrapped, StepRehash)
    latents = torch.randn(1, 3, 16, 16)
    with torch.no_grad():
        compiled_out = denoise(wrapped, latents, TIMESTEPS[:4])
        eager_out = denoise(StepRehash(unet, interval=2), latents, TIMESTEPS[:4])
    torch.testing.assert_close(compiled_out, eager_out, rtol=1e-5, atol=1e-6)
    assert wrapped.full_steps == 2 and wrapped.rehash_steps == 2
    torch._dynamo.reset()
    bare = torch.compile(unet, backend="memopt", options={"step_rehash": {"interval": 2}})
    with pytest.raises(Exception, match="step_rehash"):
        bare(latents, TIMESTEPS[0])


class _BreakingMid(nn.Module):
    """A mid block with a graph break, which ``fullgraph=True`` must refuse."""

    def __init__(self, channels):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, hidden_states, temb, encoder_hidden_states=None):
        torch._dynamo.graph_break()
        return hidden_states + torch.tanh(self.conv(hidden_states) + temb)


def test_memopt_compile_passes_fullgraph_to_the_rehashed_blocks():
    unet = ToyUNet().eval()
    unet.mid_block = _BreakingMid(unet.mid_block.conv.in_channels)
    for step_rehash in (None, {"interval": 2}):
        torch._dynamo.reset()
        compiled = memopt.compile(unet, fullgraph=True, lowering="eager", step_rehash=step_rehash)
        with torch.no_grad(), pytest.raises(Exception, match="graph_break"):
            compiled(torch.randn(1, 3, 16, 16), TIMESTEPS[0])


diffusers = pytest.importorskip("diffusers")


def test_unet3d_denoising_loop_reports_final_latent_difference(record_property):
    torch.manual_seed(4)
    unet = zoo.unet3d().eval()
    scheduler = diffusers.DDIMScheduler(num_train_timesteps=1000)
    scheduler.set_timesteps(8)
    latents = torch.randn(1, 4, 4, 16, 16)
    context = torch.randn(1, 5, 16)
    deep_calls = count_calls(unet.mid_block)

    def loop(model):
        x = latents.clone()
        for t in scheduler.timesteps:
            noise = model(x, t, encoder_hidden_states=context).sample
            x = scheduler.step(noise, t, x).prev_sample
        return x

    with torch.no_grad():
        full = loop(unet)
        rehash = StepRehash(unet, interval=2)
        reused = loop(rehash)
    assert deep_calls[0] == 8 + 4
    difference = ((reused - full).norm() / full.norm()).item()
    record_property("final_latent_relative_l2", difference)
    print(f"Step Rehash interval=2, 8 DDIM steps: final latents differ by {difference:.3e} (relative L2)")
    # Changed on purpose (random weights are no trained denoiser, so the size means little);
    # finite means the reused features kept the loop well-formed.
    assert 0 < difference < float("inf")


def _video_unet(kind: str):
    """A tiny diffusers video UNet of ``kind`` and its call (args, kwargs) at ``frames=4``."""
    frames = 4
    if kind == "unet3d":
        return zoo.unet3d().eval(), (torch.randn(1, 4, frames, 16, 16),), {"encoder_hidden_states": torch.randn(1, 5, 16)}
    if kind == "animatediff":
        context = torch.randn(frames, 5, 16)
        return zoo.unet_motion(frames).eval(), (torch.randn(1, 4, frames, 16, 16),), {"encoder_hidden_states": context}
    unet = zoo.unet_svd(frames)
    kwargs = {"encoder_hidden_states": torch.randn(1, 1, 32), "added_time_ids": torch.randn(1, 3)}
    return unet.eval(), (torch.randn(1, frames, 8, 16, 16),), kwargs


@pytest.mark.parametrize("kind", ["unet3d", "animatediff", "svd"])
@pytest.mark.parametrize("layers", [None, 1, 2])
def test_rehash_step_is_exact_where_the_reused_part_would_not_change(kind, layers):
    """With the time embedding held at zero the UNet ignores the timestep, so at a rehash step
    on the same latents the reused outputs are exactly what the skipped modules would compute:
    the output must equal a full run bit for bit. Any reuse wired to the wrong place breaks it."""
    torch.manual_seed(9)
    unet, args, kwargs = _video_unet(kind)
    unet.time_embedding.register_forward_hook(lambda module, inputs, output: torch.zeros_like(output))
    rehash = StepRehash(unet, interval=4, layers=layers)
    with torch.no_grad():
        full = unet(*args, TIMESTEPS[0], **kwargs, return_dict=False)[0]
        first = rehash(*args, TIMESTEPS[0], **kwargs, return_dict=False)[0]
        reused = rehash(*args, TIMESTEPS[1], **kwargs, return_dict=False)[0]
        moved = (args[0] + 0.5 * torch.randn_like(args[0]),)
        reused_moved = rehash(*moved, TIMESTEPS[2], **kwargs, return_dict=False)[0]
        fresh_moved = unet(*moved, TIMESTEPS[2], **kwargs, return_dict=False)[0]
    assert [record.full for record in rehash.history] == [True, False, False]
    torch.testing.assert_close(first, full, rtol=0, atol=0)
    torch.testing.assert_close(reused, full, rtol=0, atol=0)
    assert not torch.equal(reused_moved, fresh_moved)  # the reused part really was reused


def test_full_steps_keep_only_the_deep_outputs_the_shallow_path_reads():
    """Between steps the cache holds real tensors only for what a rehash step feeds into the
    shallow path; every other reused output is a zero-size stand-in of the right shape."""
    torch.manual_seed(11)
    unet, args, kwargs = _video_unet("unet3d")
    rehash = StepRehash(unet, interval=3, layers=1)
    with torch.no_grad():
        rehash(*args, TIMESTEPS[0], **kwargs)
    (cache,) = rehash._caches.values()
    real = {
        key for key, value in cache.items()
        for leaf in torch.utils._pytree.tree_leaves(value)
        if isinstance(leaf, torch.Tensor) and leaf.untyped_storage().nbytes() > leaf.element_size()
    }
    assert real and len(real) <= 2 < len(cache), (real, list(cache))
    for key, value in cache.items():
        for leaf in torch.utils._pytree.tree_leaves(value):
            if key not in real and isinstance(leaf, torch.Tensor):
                assert leaf.numel() > 1 and set(leaf.stride()) == {0}  # shape kept, no data


class FlexUp(Up):
    """An up block that resizes its skip to its own resolution."""

    def forward(self, hidden_states, res_hidden_states_tuple, temb):
        size = (2 * hidden_states.shape[-2], 2 * hidden_states.shape[-1])
        return super().forward(hidden_states, (F.interpolate(res_hidden_states_tuple[-1], size=size),), temb)


class SkipUNet(ToyUNet):
    """The outer up block's skip is computed between blocks: from the outer down block's
    output (``"shallow"``), from the deep one through an interpolation (``"computed"``), or
    handed over directly from the deep one after the first step (``"late"``). No time
    embedding, so a rehash step on the same latents must reproduce a full step."""

    def __init__(self, skip: str) -> None:
        super().__init__()
        self.skip = skip
        self.up_blocks[1] = FlexUp(8)

    def forward(self, sample, timestep, encoder_hidden_states=None, return_dict=True):
        temb = torch.zeros(1, 1, 1, 1)
        h0, (s0,) = self.down_blocks[0](hidden_states=self.conv_in(sample), temb=temb)
        h1, (s1,) = self.down_blocks[1](hidden_states=h0, temb=temb)
        h = self.up_blocks[0](hidden_states=self.mid_block(h1, temb), res_hidden_states_tuple=(s1,), temb=temb)
        if self.skip == "computed":
            skip = s0 + F.interpolate(s1, scale_factor=2.0)
        elif self.skip == "late" and float(timestep) < 850:
            skip = s1  # a deep output, handed over as it is
        else:
            skip = s0
        h = self.up_blocks[1](hidden_states=h, res_hidden_states_tuple=(skip,), temb=temb)
        return (self.conv_out(h),)


def test_the_cache_shrinks_only_where_a_rehash_step_reproduces_a_full_step():
    x = torch.randn(1, 3, 16, 16)
    for skip, shrinks in (("shallow", True), ("computed", False)):
        torch.manual_seed(12)
        unet = SkipUNet(skip).eval()
        rehash = StepRehash(unet, interval=3)
        with torch.no_grad():
            full = unet(x, TIMESTEPS[0])[0]
            rehash(x, TIMESTEPS[0])
            reused = rehash(x, TIMESTEPS[1])[0]
        assert rehash._shrinks == {0: shrinks}, skip
        # Either way the rehash step on the same latents equals the full step: dropping the
        # deep output the computed skip reads would have made it differ.
        torch.testing.assert_close(reused, full, rtol=0, atol=0)


def test_a_rehash_step_refuses_a_deep_output_it_did_not_keep():
    torch.manual_seed(13)
    rehash = StepRehash(SkipUNet("late").eval(), interval=3)
    x = torch.randn(1, 3, 16, 16)
    with torch.no_grad():
        rehash(x, TIMESTEPS[0])  # 900: full, and the outer up block reads only shallow values
        with pytest.raises(RuntimeError, match=r"up\.1 reads the output of down\.1#0 at a rehash step"):
            rehash(x, TIMESTEPS[1])  # 800: the late routing hands it a dropped output


def test_layers_cut_runs_only_the_last_up_layer_at_rehash_steps():
    torch.manual_seed(10)
    unet, args, kwargs = _video_unet("unet3d")
    up = unet.up_blocks[-1]
    deep = {
        "down layer": count_calls(unet.down_blocks[0].resnets[0]),
        "downsampler": count_calls(unet.down_blocks[0].downsamplers[0]),
        "mid": count_calls(unet.mid_block),
        "first up layer": count_calls(up.resnets[0]),
        "its attention": count_calls(up.temp_attentions[0]),
    }
    shallow = {"last up layer": count_calls(up.resnets[-1]), "its attention": count_calls(up.temp_attentions[-1])}
    rehash = StepRehash(unet, interval=3, layers=1)
    with torch.no_grad():
        for t in TIMESTEPS[:6]:
            rehash(*args, t, **kwargs)
    assert {name: calls[0] for name, calls in deep.items()} == dict.fromkeys(deep, 2)  # steps 0 and 3
    # 6 steps, plus the one shallow pass that checks the shrunk cache after the first step.
    assert {name: calls[0] for name, calls in shallow.items()} == dict.fromkeys(shallow, 7)
    assert isinstance(up.resnets[0], type(up.resnets[-1])) and "StandIn" not in type(up.resnets[0]).__name__


def test_threshold_with_layers_measures_the_features_entering_the_cut():
    """AnimateDiff's resnets take ``input_tensor=``: the distance is still measured."""
    torch.manual_seed(12)
    unet, args, kwargs = _video_unet("animatediff")
    rehash = StepRehash(unet, threshold=1e-3, layers=1)
    moved = (args[0] + torch.randn_like(args[0]),)
    with torch.no_grad():
        for latents, t in zip((args, args, moved), TIMESTEPS):
            rehash(*latents, t, **kwargs)
    assert [record.full for record in rehash.history] == [True, False, True]
    assert rehash.history[1].distance == 0.0 and rehash.history[2].distance > 1e-3


def test_layers_option_is_validated_and_reaches_memopt_compile():
    unet, args, kwargs = _video_unet("unet3d")
    with pytest.raises(ValueError, match=r"layers must be in \[1, 2\]"):
        StepRehash(unet, interval=2, layers=3)
    with pytest.raises(ValueError, match="'layers' must be None or an int >= 1"):
        memopt.Config(step_rehash={"interval": 2, "layers": 0})
    with pytest.raises(ValueError, match="has no 'resnets' list"):
        StepRehash(ToyUNet(), interval=2, layers=1)
    torch._dynamo.reset()
    torch.manual_seed(11)
    wrapped = memopt.compile(unet, step_rehash={"interval": 2, "layers": 1}, lowering="eager", slicing=False)
    assert wrapped.options.layers == 1
    with torch.no_grad():
        compiled = [wrapped(*args, t, **kwargs).sample for t in TIMESTEPS[:2]]
        plain = StepRehash(unet, interval=2, layers=1)
        eager = [plain(*args, t, **kwargs).sample for t in TIMESTEPS[:2]]
    for got, want in zip(compiled, eager):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert wrapped.rehash_steps == 1


def _unet2d(down_types, up_types):
    """A tiny diffusers UNet2DConditionModel whose time embedding is held at zero, so it
    ignores the timestep: a rehash step on a full step's inputs reproduces it bit for bit."""
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, down_block_types=down_types, up_block_types=up_types,
        block_out_channels=(16, 32), layers_per_block=1, norm_num_groups=4, cross_attention_dim=16,
        attention_head_dim=4,
    ).eval()
    unet.time_embedding.register_forward_hook(lambda module, inputs, output: torch.zeros_like(output))
    return unet


def test_controlnet_residuals_are_per_step_inputs_not_conditioning():
    """A ControlNet hands the UNet new residuals at every step. They are added between blocks by
    the UNet's code, like the latents they change with every step: they must not make every
    step full, and a rehash step must add this step's residuals to the shallow path."""
    torch.manual_seed(12)
    unet = _unet2d(("CrossAttnDownBlock2D", "DownBlock2D"), ("UpBlock2D", "CrossAttnUpBlock2D"))
    sample, context = torch.randn(1, 4, 16, 16), torch.randn(1, 5, 16)
    # Residuals for (conv_in, down 0's layer, down 0's downsampler, down 1's layer) and the mid block.
    shapes = [(16, 16, 16), (16, 16, 16), (16, 8, 8), (32, 8, 8)]

    def control(shallow_seed):
        deep = [torch.randn(1, *shape, generator=torch.Generator().manual_seed(1)) for shape in shapes]
        shallow = torch.randn(1, *shapes[0], generator=torch.Generator().manual_seed(shallow_seed))
        return {
            "down_block_additional_residuals": [shallow, *deep[1:]],
            "mid_block_additional_residual": torch.randn(1, 32, 8, 8, generator=torch.Generator().manual_seed(2)),
        }

    for layers in (None, 1):
        rehash = StepRehash(unet, interval=4, layers=layers)
        with torch.no_grad():
            outputs = [rehash(sample, t, context, **control(seed), return_dict=False)[0]
                       for seed, t in zip((10, 11, 12), TIMESTEPS)]
            # The first residual feeds only the outermost up block's last layer (shallow for
            # every cut): with it alone changed, a full run computes what a rehash step reuses.
            expected = [unet(sample, t, context, **control(seed), return_dict=False)[0]
                        for seed, t in zip((10, 11, 12), TIMESTEPS)]
        assert [record.full for record in rehash.history] == [True, False, False], layers
        for got, want in zip(outputs, expected):
            torch.testing.assert_close(got, want, rtol=0, atol=0)
        assert not torch.equal(outputs[1], outputs[2])  # this step's residual was applied


def test_a_controlnet_denoising_loop_rehashes():
    """diffusers' ControlNetModel (built from the UNet) computes new residuals at every step,
    handed to the wrapper as a ControlNet pipeline hands them to ``pipe.unet``."""
    from diffusers import ControlNetModel

    torch.manual_seed(14)
    unet = _unet2d(("CrossAttnDownBlock2D", "DownBlock2D"), ("UpBlock2D", "CrossAttnUpBlock2D"))
    controlnet = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(8, 16)).eval()
    latents, context, image = torch.randn(1, 4, 16, 16), torch.randn(1, 5, 16), torch.randn(1, 3, 32, 32)

    def generate(model):
        x = latents
        for t in TIMESTEPS[:6]:
            down, mid = controlnet(x, t, encoder_hidden_states=context, controlnet_cond=image, return_dict=False)
            residuals = {"down_block_additional_residuals": down, "mid_block_additional_residual": mid}
            x = x - 0.05 * model(x, t, context, **residuals, return_dict=False)[0]
        return x

    rehash = StepRehash(unet, interval=3)
    with torch.no_grad():
        full, reused = generate(unet), generate(rehash)
    assert [record.full for record in rehash.history] == [True, False, False] * 2
    difference = ((reused - full).norm() / full.norm()).item()
    print(f"Step Rehash with a ControlNet, interval=3, 6 steps: final latents differ by {difference:.3e}")
    assert 0 < difference < 1


@pytest.mark.parametrize("layers", [None, 1, 2])
def test_a_t2i_adapter_that_writes_into_deep_outputs_rehashes_exactly(layers):
    """A T2I-Adapter's residuals come as a list that the UNet pops from, and are added to the
    outputs of down blocks without cross-attention with ``sample += ...``: in place. Cut with
    ``layers``, the first down block's downsampler is deep, so at a rehash step that write
    lands on what the cache handed out. Where the cache keeps no data for it (a zero-size
    stand-in) the write fails, so the shrink check (which must replay the call with the list as
    it was) keeps the whole cache; the written output feeds only the deep part, and every
    rehash step is exact."""
    torch.manual_seed(13)
    unet = _unet2d(("DownBlock2D", "CrossAttnDownBlock2D"), ("CrossAttnUpBlock2D", "UpBlock2D"))
    sample, context = torch.randn(1, 4, 16, 16), torch.randn(1, 5, 16)
    residuals = [torch.randn(1, 16, 8, 8), torch.randn(1, 32, 8, 8)]

    def call(model, t):
        adapter = [r.clone() for r in residuals]  # a fresh list at every step, as pipelines pass it
        return model(sample, t, context, down_intrablock_additional_residuals=adapter, return_dict=False)[0]

    rehash = StepRehash(unet, interval=5, layers=layers)
    with torch.no_grad():
        full = call(unet, TIMESTEPS[0])
        outputs = [call(rehash, t) for t in TIMESTEPS[:5]]
    assert [record.full for record in rehash.history] == [True, False, False, False, False]
    for got in outputs:
        torch.testing.assert_close(got, full, rtol=0, atol=0)
    # Without the cut nothing deep is written into, and the cache shrinks.
    assert rehash._shrinks == {0: layers is None}


def _text_to_video_pipeline():
    """diffusers' TextToVideoSDPipeline around zoo's tiny UNet3D and a tiny VAE, driven by
    prompt embeddings (no text encoder or tokenizer: nothing to download)."""
    torch.manual_seed(5)
    unet = zoo.unet3d().eval()
    vae = diffusers.AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), latent_channels=4, norm_num_groups=4,
    ).eval()
    pipe = diffusers.TextToVideoSDPipeline(
        vae=vae, text_encoder=None, tokenizer=None, unet=unet, scheduler=diffusers.DDIMScheduler(num_train_timesteps=1000)
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe, unet


def _generate(pipe, guidance_scale: float) -> torch.Tensor:
    embeds = torch.randn(1, 5, 16, generator=torch.Generator().manual_seed(6))
    negative = torch.randn(1, 5, 16, generator=torch.Generator().manual_seed(7))
    return pipe(
        prompt_embeds=embeds, negative_prompt_embeds=negative, num_frames=4, height=32, width=32,
        num_inference_steps=4, guidance_scale=guidance_scale, output_type="latent",
        generator=torch.Generator().manual_seed(8),
    ).frames


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_diffusers_pipeline_runs_compiled_sliced_and_rehashed():
    """The pipeline's own calling convention (classifier-free guidance doubles the batch,
    ``return_dict=False``, attribute access on ``pipe.unet``) through memopt's wrappers."""
    pipe, unet = _text_to_video_pipeline()
    with torch.no_grad():
        full = _generate(pipe, guidance_scale=1.0)
        # Sliced and compiled: exact up to float32 reassociation, compounded over 4 steps.
        pipe.unet = memopt.compile(unet, lowering="eager", slicing={"min_group_bytes": 1024, "max_slice_bytes": 16 << 10})
        sliced = _generate(pipe, guidance_scale=1.0)
        assert any(r.name == "slicing" and r.rewrites > 0 for r in memopt.last_report().passes)
        assert ((sliced - full).abs().max() / full.abs().max()).item() < 1e-4
        # Step Rehash under classifier-free guidance: half the steps in full, and a second
        # generation starts afresh (timesteps went up again), so it repeats the first exactly.
        torch._dynamo.reset()
        pipe.unet = memopt.compile(unet, lowering="eager", slicing=False, step_rehash={"interval": 2})
        first = _generate(pipe, guidance_scale=7.5)
        assert (pipe.unet.full_steps, pipe.unet.rehash_steps) == (2, 2)
        second = _generate(pipe, guidance_scale=7.5)
        assert (pipe.unet.full_steps, pipe.unet.rehash_steps) == (4, 4)
        torch.testing.assert_close(second, first, rtol=0, atol=0)
        pipe.unet = unet
        assert not torch.equal(first, _generate(pipe, guidance_scale=7.5))  # rehash did change it
