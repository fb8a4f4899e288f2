"""Small models with random weights that memopt must compile exactly.

Every function here is a model factory (also usable as a ``memopt inspect`` target such as
``tests/zoo.py:conv_bn``) with a matching ``<name>_inputs()`` that makes fresh random inputs.
Models from ``transformers`` and ``diffusers`` are built from tiny configs: nothing is
downloaded.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(17, 64), nn.GELU(), nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 5))


def mlp_inputs() -> tuple[torch.Tensor, ...]:
    return (torch.randn(9, 17),)


class ConvBN(nn.Module):
    """Conv -> BatchNorm -> ReLU twice, a strided conv, pooling and a classifier (odd sizes)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 12, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(12)
        self.conv2 = nn.Conv2d(12, 12, 3, padding=1, groups=3)
        self.bn2 = nn.BatchNorm2d(12)
        self.down = nn.Conv2d(12, 20, 3, stride=2)
        self.fc = nn.Linear(20, 7)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = x + F.relu(self.bn2(self.conv2(x)))
        x = F.silu(self.down(x))
        return self.fc(x.mean((2, 3)))


def conv_bn() -> nn.Module:
    return ConvBN()


def conv_bn_inputs() -> tuple[torch.Tensor, ...]:
    return (torch.randn(3, 3, 15, 13),)


class RevNet(nn.Module):
    """RevNet-style couplings ``x1 += F(x2); x2 += G(x1)`` whose branches are conv 3x3 ->
    BatchNorm -> ReLU, between a stem conv and a pooled classifier (odd sizes)."""

    def __init__(self, depth: int = 2, channels: int = 5) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 2 * channels, 3, padding=1)
        self.f = nn.ModuleList(self._branch(channels) for _ in range(depth))
        self.g = nn.ModuleList(self._branch(channels) for _ in range(depth))
        self.head = nn.Linear(2 * channels, 7)

    @staticmethod
    def _branch(channels: int) -> nn.Module:
        return nn.Sequential(
            nn.Conv2d(channels, channels, 3, padding=1, bias=False), nn.BatchNorm2d(channels), nn.ReLU()
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x1, x2 = self.stem(x).chunk(2, dim=1)
        for f, g in zip(self.f, self.g):
            x1 = x1 + f(x2)
            x2 = x2 + g(x1)
        return self.head(torch.cat([x1, x2], dim=1).mean((2, 3)))


def revnet() -> nn.Module:
    return RevNet()


def revnet_inputs() -> tuple[torch.Tensor, ...]:
    return (torch.randn(3, 3, 11, 9),)


class TransformerBlock(nn.Module):
    """Pre-norm block with scaled-dot-product attention (causal) and a GELU MLP."""

    def __init__(self, dim: int = 48, heads: int = 3) -> None:
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.out = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, tokens, dim = x.shape
        q, k, v = self.qkv(self.norm1(x)).chunk(3, dim=-1)
        q, k, v = (t.view(batch, tokens, self.heads, -1).transpose(1, 2) for t in (q, k, v))
        attended = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.out(attended.transpose(1, 2).reshape(batch, tokens, dim))
        return x + self.mlp(self.norm2(x))


def transformer_block() -> nn.Module:
    return TransformerBlock()


def transformer_block_inputs() -> tuple[torch.Tensor, ...]:
    return (torch.randn(2, 11, 48),)


class GraphBreakNet(nn.Module):
    """Breaks the graph on purpose (a data-dependent Python branch)."""

    def __init__(self) -> None:
        super().__init__()
        self.first = nn.Linear(8, 8)
        self.second = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.first(x))
        if x.sum().item() > 0:  # .item() ends Dynamo's graph here
            x = x * 2
        return self.second(x)


def graph_break_net() -> nn.Module:
    return GraphBreakNet()


def graph_break_net_inputs() -> tuple[torch.Tensor, ...]:
    return (torch.randn(4, 8),)


def gpt2() -> nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(
        vocab_size=97, n_positions=32, n_embd=32, n_layer=2, n_head=2,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
    )
    return GPT2LMHeadModel(config)


def gpt2_inputs() -> tuple[torch.Tensor, ...]:
    return (torch.randint(0, 97, (2, 13)),)


def bert() -> nn.Module:
    from transformers import BertConfig, BertModel

    config = BertConfig(
        vocab_size=101, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=64, max_position_embeddings=32,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )
    return BertModel(config)


def bert_inputs() -> tuple[torch.Tensor, ...]:
    return (torch.randint(0, 101, (2, 11)),)



class Logits(nn.Module):
    """A ``transformers`` model called with fixed keyword arguments, returning its logits (or
    last hidden state): what a training loop reads, without the key/value cache object."""

    def __init__(self, model: nn.Module, **kwargs: object) -> None:
        super().__init__()
        self.model = model
        self.kwargs = kwargs

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        names = ("input_ids", "decoder_input_ids")[: len(inputs)]
        output = self.model(**dict(zip(names, inputs)), **self.kwargs)
        return output.logits if hasattr(output, "logits") else output.last_hidden_state


def llama() -> nn.Module:
    """RMSNorm, rotary positions, grouped-query attention (one key/value head) and a SwiGLU MLP."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=89, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=1, max_position_embeddings=64,
    )
    return Logits(LlamaForCausalLM(config), use_cache=False)


def llama_inputs() -> tuple[torch.Tensor, ...]:
    return (torch.randint(0, 89, (2, 9)),)


def t5() -> nn.Module:
    """An encoder-decoder with relative position biases and cross-attention."""
    from transformers import T5Config, T5ForConditionalGeneration

    config = T5Config(
        vocab_size=83, d_model=32, d_ff=64, d_kv=8, num_heads=4, num_layers=2, num_decoder_layers=2,
        dropout_rate=0.0, decoder_start_token_id=0,
    )
    return Logits(T5ForConditionalGeneration(config), use_cache=False)


def t5_inputs() -> tuple[torch.Tensor, ...]:
    return (torch.randint(0, 83, (2, 11)), torch.randint(0, 83, (2, 5)))


def vit() -> nn.Module:
    """A vision transformer: a strided patch convolution, then encoder layers."""
    from transformers import ViTConfig, ViTModel

    config = ViTConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, image_size=20,
        patch_size=4, num_channels=3, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )
    return ViTModel(config)


def vit_inputs() -> tuple[torch.Tensor, ...]:
    return (torch.randn(2, 3, 20, 20),)

class UNetWrapper(nn.Module):
    """A tiny ``diffusers`` UNet2DConditionModel called the way a pipeline calls it."""

    def __init__(self) -> None:
        super().__init__()
        from diffusers import UNet2DConditionModel

        self.unet = UNet2DConditionModel(
            sample_size=8,
            in_channels=4,
            out_channels=4,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            block_out_channels=(16, 32),
            layers_per_block=1,
            norm_num_groups=8,
            cross_attention_dim=16,
            attention_head_dim=4,
        )

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        return self.unet(sample, timestep, encoder_hidden_states=context, return_dict=False)[0]


def unet2d() -> nn.Module:
    return UNetWrapper()


def unet2d_inputs() -> tuple[torch.Tensor, ...]:
    return (torch.randn(2, 4, 8, 8), torch.tensor([10, 500]), torch.randn(2, 5, 16))


def unet3d() -> nn.Module:
    """A tiny ``diffusers`` UNet3DConditionModel (a video UNet: 3-D blocks, temporal layers)."""
    from diffusers import UNet3DConditionModel

    return UNet3DConditionModel(
        in_channels=4, out_channels=4,
        down_block_types=("CrossAttnDownBlock3D", "DownBlock3D"),
        up_block_types=("UpBlock3D", "CrossAttnUpBlock3D"),
        block_out_channels=(16, 32), layers_per_block=1, norm_num_groups=4,
        cross_attention_dim=16, attention_head_dim=8,
    )


def unet_motion(frames: int = 4) -> nn.Module:
    """A tiny ``diffusers`` UNetMotionModel (AnimateDiff: 2-D blocks with motion modules)."""
    from diffusers import UNetMotionModel

    return UNetMotionModel(
        in_channels=4, out_channels=4,
        down_block_types=("CrossAttnDownBlockMotion", "DownBlockMotion"),
        up_block_types=("UpBlockMotion", "CrossAttnUpBlockMotion"),
        block_out_channels=(16, 32), layers_per_block=1, norm_num_groups=4,
        cross_attention_dim=16, num_attention_heads=2, motion_num_attention_heads=2,
        motion_max_seq_length=max(8, frames),
    )


def unet_svd(frames: int = 4) -> nn.Module:
    """A tiny ``diffusers`` UNetSpatioTemporalConditionModel (SVD: spatial and temporal
    branches mixed by AlphaBlenders); called with 8 input channels, a ``[1, 1, 32]`` context
    and ``added_time_ids`` of shape ``[1, 3]``."""
    from diffusers import UNetSpatioTemporalConditionModel

    return UNetSpatioTemporalConditionModel(
        in_channels=8, out_channels=4,
        down_block_types=("CrossAttnDownBlockSpatioTemporal", "DownBlockSpatioTemporal"),
        up_block_types=("UpBlockSpatioTemporal", "CrossAttnUpBlockSpatioTemporal"),
        block_out_channels=(32, 64), layers_per_block=1, cross_attention_dim=32,
        num_attention_heads=(2, 2), addition_time_embed_dim=4, projection_class_embeddings_input_dim=12,
        num_frames=frames,
    )


class GroupNormConvNet(nn.Module):
    """Activations dominate: 3 channels in and out, ``width`` to ``2 * width`` inside, GroupNorm
    between (what the slicing pass slices per sample)."""

    def __init__(self, width: int = 48) -> None:
        super().__init__()
        self.conv_in = nn.Conv2d(3, width, 3, padding=1)
        self.norm1 = nn.GroupNorm(4, width)
        self.conv1 = nn.Conv2d(width, 2 * width, 3, padding=1)
        self.norm2 = nn.GroupNorm(8, 2 * width)
        self.conv2 = nn.Conv2d(2 * width, width, 3, padding=1)
        self.conv_out = nn.Conv2d(width, 3, 3, padding=1)

    def forward(self, x):
        h = self.conv_in(x)
        r = F.silu(self.norm1(h))
        r = self.conv2(F.silu(self.norm2(self.conv1(r))))
        return self.conv_out(h + r)
