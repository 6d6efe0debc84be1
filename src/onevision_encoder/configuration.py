"""Configuration of the OneVision Encoder (same keys as the published `config.json`)."""

from transformers import PretrainedConfig


class OneVisionEncoderConfig(PretrainedConfig):
    r"""Configuration of a [`OneVisionEncoderModel`].

    The defaults describe the published ViT-L (`lmms-lab-encoder/onevision-encoder-large`).

    Args:
        hidden_size: width of the transformer (1024 for ViT-L).
        intermediate_size: width of the MLP hidden layer.
        num_hidden_layers: number of transformer blocks.
        num_attention_heads: attention heads; `hidden_size / num_attention_heads` (head_dim) must be a
            multiple of 32 so the rotary half splits 4:6:6 into whole frequencies (64 in every release).
        num_channels: input channels.
        image_size: nominal image size; metadata only, the model takes any multiple of `patch_size`.
        patch_size: side of a square patch in pixels.
        hidden_act: MLP activation (`"gelu"` is the exact erf GELU).
        layer_norm_eps: epsilon of every norm, the head's RMSNorm included.
        layer_norm_type: `"layer_norm"` or `"rms_norm"` for the encoder's norms.
        attention_dropout: dropout on attention probabilities (training only).
        initializer_range: std of the normal init of linear and conv weights.
        rope_theta: base of the rotary frequencies.
        rope_temporal_size: number of temporal RoPE slots a clip is spread over (64).
        use_head: whether the model has `layernorm_post` and the attention-pooling head.
    """

    model_type = "onevision_encoder"

    def __init__(
        self,
        hidden_size: int = 1024,
        intermediate_size: int = 4096,
        num_hidden_layers: int = 24,
        num_attention_heads: int = 16,
        num_channels: int = 3,
        image_size: int = 448,
        patch_size: int = 14,
        hidden_act: str = "gelu",
        layer_norm_eps: float = 1e-6,
        layer_norm_type: str = "layer_norm",
        attention_dropout: float = 0.0,
        initializer_range: float = 0.02,
        rope_theta: float = 10000.0,
        rope_temporal_size: int = 64,
        use_head: bool = True,
        **kwargs,
    ):
        if hidden_size % num_attention_heads:
            raise ValueError(f"hidden_size {hidden_size} is not a multiple of num_attention_heads {num_attention_heads}")
        head_dim = hidden_size // num_attention_heads
        if head_dim % 32:
            raise ValueError(f"head_dim {head_dim} must be a multiple of 32 for the 4:6:6 rotary split")
        if layer_norm_type not in ("layer_norm", "rms_norm"):
            raise ValueError(f"layer_norm_type must be 'layer_norm' or 'rms_norm', got {layer_norm_type!r}")
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_channels = num_channels
        self.image_size = image_size
        self.patch_size = patch_size
        self.hidden_act = hidden_act
        self.layer_norm_eps = layer_norm_eps
        self.layer_norm_type = layer_norm_type
        self.attention_dropout = attention_dropout
        self.initializer_range = initializer_range
        self.rope_theta = rope_theta
        self.rope_temporal_size = rope_temporal_size
        self.use_head = use_head
        super().__init__(**kwargs)
