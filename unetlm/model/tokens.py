"""The byte vocabulary: 256 byte values and two specials."""
import torch

BOS = 256  # starts every document; predicting it means "the document ends here"
PAD = 257  # fills sequences; never a target
VOCAB = 258


def encode(data: bytes, bos: bool = True) -> torch.Tensor:
    ids = torch.frombuffer(bytearray(data), dtype=torch.uint8).long() if data else torch.zeros(0, dtype=torch.long)
    return torch.cat([torch.tensor([BOS]), ids]) if bos else ids


def documents_from_tokens(tokens: torch.Tensor) -> torch.Tensor:
    """Document ids (B, T) for a batch where each BOS starts a new document."""
    return (tokens == BOS).long().cumsum(1)
