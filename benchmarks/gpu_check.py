"""Quick CUDA checks of the padding-free path (run first in a device call): PyTorch's varlen
attention against one SDPA per row, with GQA; what this torch's varlen signature offers."""

from __future__ import annotations

import inspect
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    import torch
    from loraburst.remote import attention
    from torch.nn.attention.varlen import varlen_attn

    print(
        "torch", torch.__version__, "varlen params", list(inspect.signature(varlen_attn).parameters)
    )
    torch.manual_seed(0)
    lens = [300, 17, 1024, 707]
    cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32, device="cuda")
    T = sum(lens)
    q = torch.randn(1, 32, T, 128, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(1, 8, T, 128, device="cuda", dtype=torch.bfloat16)
    v = torch.randn(1, 8, T, 128, device="cuda", dtype=torch.bfloat16)

    class M(torch.nn.Module):
        training = True

    out, _ = attention.varlen_attention(
        M(), q, k, v, None, scaling=128**-0.5, cu_seq_lens_q=cu, max_length_q=max(lens)
    )
    ref = attention._per_row(
        q[0].transpose(0, 1), k[0].transpose(0, 1), v[0].transpose(0, 1), cu, 4, 128**-0.5, None
    )
    err = (out[0].float() - ref.float()).abs().max().item()
    print("varlen vs per-row max abs err", err)
    assert err < 2e-2, err


if __name__ == "__main__":
    main()
