"""What every frozen-backbone model shares: parameter counts, slim checkpoints, the backbone check."""

from __future__ import annotations

import hashlib

import torch

from recbole_llm.errors import RecboleLLMError

BACKBONE_HASH_KEY = "backbone_sha256"


def tensor_sha256(named_tensors) -> str:
    """SHA-256 over names and bytes: the identity of a set of weights."""
    digest = hashlib.sha256()
    for name, tensor in named_tensors:
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


class FrozenBackboneMixin:
    """For models whose ``encoder`` backbone stays frozen: checkpoints hold only what trained.

    A checkpoint's state dict holds the trainable tensors and the SHA-256 of the backbone's frozen weights;
    loading it onto a model whose backbone hashes differently is refused.
    """

    def remember_backbone(self) -> None:
        name = self.pretrained_model_name_or_path
        self.backbone_name = f"'{name}'" if name else "the random encoder"
        self.backbone_hash = tensor_sha256(sorted(self.encoder.state_dict().items()))

    def parameter_counts(self) -> tuple[int, int, int]:
        """(trainable, total, encoder total) parameter counts."""
        trainable = sum(p.numel() for p in self.parameters() if p.requires_grad)
        total = sum(p.numel() for p in self.parameters())
        encoder = sum(p.numel() for p in self.encoder.parameters())
        return trainable, total, encoder

    def __str__(self):
        # the plugin model's one-line-per-part summary (encoder, item text, widths), then the trained share
        trainable, total, _ = self.parameter_counts()
        return super().__str__() + f" of {total} ({100 * trainable / total:.2f}%)"

    def checkpoint_state_dict(self) -> dict[str, torch.Tensor]:
        """The trainable tensors, everything outside the encoder, and the backbone's hash."""
        trainable = {name for name, p in self.named_parameters() if p.requires_grad}
        state = {
            name: tensor
            for name, tensor in self.state_dict().items()
            if name in trainable or not name.startswith("encoder.")
        }
        state[BACKBONE_HASH_KEY] = torch.tensor(list(bytes.fromhex(self.backbone_hash)), dtype=torch.uint8)
        return state

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        state_dict = dict(state_dict)
        stored = state_dict.pop(BACKBONE_HASH_KEY, None)
        if stored is None:  # a full state dict
            return super().load_state_dict(state_dict, strict=strict, assign=assign)
        if bytes(stored.to(torch.uint8).tolist()).hex() != self.backbone_hash:
            raise RecboleLLMError(
                f"checkpoint was trained on a different backbone than {self.backbone_name} (its weights "
                "differ); set pretrained_model_name_or_path and backbone_layers as in training"
            )
        result = super().load_state_dict(state_dict, strict=False, assign=assign)
        frozen = {name for name, p in self.named_parameters() if not p.requires_grad}
        frozen |= {name for name, _ in self.named_buffers()}
        missing = [name for name in result.missing_keys if name not in frozen]
        if strict and (missing or result.unexpected_keys):
            raise RecboleLLMError(
                f"checkpoint does not fit this model: missing {missing[:3]}, unexpected "
                f"{result.unexpected_keys[:3]}; load it with the config it was trained with"
            )
        return result
