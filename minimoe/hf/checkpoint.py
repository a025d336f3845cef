"""A local transformers MoE checkpoint and its tokenizer, loaded for ``minimoe trace --hf DIR``.

Everything comes from the directory (``local_files_only``: never the hub). Whatever the checkpoint's
libraries raise on damaged weights, configs or tokenizer files (OSError, ValueError, SafetensorError...)
becomes one ValueError naming the flag, the directory and the first line of the cause, which the command
line prints as its one error line.
"""
from __future__ import annotations

from minimoe.arguments import check_model_dir, check_tokenizer_files
from minimoe.hf.convert import load_hf


def load_for_tracing(flag: str, path: str):
    """(hf model in eval mode, tokenize: str -> list[int] token ids) of the checkpoint at ``path``.

    ``flag`` names the option in messages (``--hf``). Raises FileNotFoundError or ValueError (one line) for a
    missing directory, missing config or tokenizer files, or a checkpoint or tokenizer that cannot be loaded."""
    check_model_dir(flag, path)
    check_tokenizer_files(flag, path)
    from transformers import AutoTokenizer

    try:
        model = load_hf(path).eval()
    except Exception as error:  # damaged weights or configs raise OSError, ValueError, SafetensorError...
        first = str(error).strip().splitlines()[0] if str(error).strip() else ""
        raise ValueError(f"{flag} {path}: cannot load the checkpoint ({type(error).__name__}: {first[:200]})") \
            from None
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    except Exception as error:  # a damaged tokenizer file raises whatever its library raises
        raise ValueError(f"{flag} {path}: cannot load the tokenizer ({type(error).__name__}: "
                         f"{str(error).strip()[:200]})") from None
    return model, lambda text: tokenizer(text)["input_ids"]
