"""Generation with the model's own chat template (the same rendering training used).

`generate_replies` is the shared core; the `tunesmith infer` command (chat and batch) builds on it.
"""
from __future__ import annotations

from typing import Optional


def generate_replies(model, tokenizer, conversations: list[list[dict]], max_new_tokens: int = 64,
                     system: Optional[str] = None, temperature: float = 0.0, skip_special_tokens: bool = True,
                     **template_kwargs) -> list[str]:
    """Reply to each conversation (a list of messages ending with the user's turn). Greedy when temperature is 0.

    Rows are generated as one left-padded batch; the template's end-of-turn tokens stop generation.
    """
    import torch

    from tunesmith.data.encode import ChatEncoder

    enc = ChatEncoder(tokenizer, system=system)
    prompts = [enc.render(enc.with_system(c), add_generation_prompt=True, **template_kwargs) for c in conversations]
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    try:
        batch = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    finally:
        tokenizer.padding_side = side
    device = next(model.parameters()).device
    batch = {k: v.to(device) for k, v in batch.items()}
    stop = {tokenizer.eos_token_id}
    for text in enc.end_of_turn_tokens():  # e.g. <|im_end|>, <|eot_id|>, <|end|>/<|return|>
        ids = tokenizer.convert_tokens_to_ids(text)
        if isinstance(ids, int) and ids != tokenizer.unk_token_id:
            stop.add(ids)
    gen_kwargs = dict(max_new_tokens=max_new_tokens, eos_token_id=sorted(i for i in stop if i is not None),
                      pad_token_id=tokenizer.pad_token_id)
    if temperature and temperature > 0:
        gen_kwargs.update(do_sample=True, temperature=temperature)
    else:
        gen_kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
    was_training = model.training
    model.eval()
    with torch.no_grad():
        out = model.generate(**batch, **gen_kwargs)
    if was_training:
        model.train()
    replies = []
    for row in out[:, batch["input_ids"].shape[1]:].tolist():
        # cut at the first stop token: what follows is padding of rows that finished early
        end = next((i + 1 for i, t in enumerate(row) if t in stop), len(row))
        text = tokenizer.decode(row[:end], skip_special_tokens=skip_special_tokens)
        replies.append(text.strip() if skip_special_tokens else text)  # raw output is shown exactly as generated
    return replies
