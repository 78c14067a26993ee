"""kd on chat data for text LMs: messages with roles -> the tokenizer's chat template -> labels on assistant turns
only, through the `conversations` builder, from local model folders."""

import json

import pytest
import torch
import yaml

TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
            "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
CHATS = [
    [("system", "You answer briefly."), ("user", "what does a cat sit on?"), ("assistant", "the cat sat on the mat."),
     ("user", "and the dog?"), ("assistant", "the dog ran in the park.")],
    [("user", "where did the dog run?"), ("assistant", "in the park.")],
    [("user", "name an animal."), ("assistant", "a cat.")],
]


def _tokenizer():
    from vlmdistill.data.text import train_tokenizer

    texts = [content for chat in CHATS for _, content in chat] * 10
    tok = train_tokenizer(texts, vocab_size=200)
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tok.chat_template = TEMPLATE
    return tok


@pytest.fixture()
def workspace(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = _tokenizer()
    shape = dict(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_attention_heads=4,
                 num_key_value_heads=2, pad_token_id=tok.pad_token_id)
    for name, layers, seed in (("lm-small", 2, 0), ("lm-big", 3, 1)):
        torch.manual_seed(seed)
        LlamaForCausalLM(LlamaConfig(num_hidden_layers=layers, **shape)).save_pretrained(tmp_path / name)
        tok.save_pretrained(tmp_path / name)
    with open(tmp_path / "chats.jsonl", "w") as fh:
        for i in range(12):
            chat = CHATS[i % len(CHATS)]
            fh.write(json.dumps({"messages": [{"role": r, "content": c} for r, c in chat]}) + "\n")
    return tmp_path


def test_labels_cover_the_assistant_turns_only(workspace):
    from transformers import AutoTokenizer

    from vlmdistill.data.chat import ChatCollator
    from vlmdistill.data.conversations import ConversationDataset

    tok = AutoTokenizer.from_pretrained(workspace / "lm-small")
    dataset = ConversationDataset(str(workspace / "chats.jsonl"))
    batch = ChatCollator(tok)([dataset[i] for i in range(3)])
    for row, chat in enumerate(CHATS):
        ids, labels = batch["input_ids"][row], batch["labels"][row]
        supervised = tok.decode(labels[labels != -100])
        assert supervised == "".join(f"{c}<|im_end|>\n" for r, c in chat if r == "assistant")
        unsupervised = tok.decode(ids[(labels == -100) & (batch["attention_mask"][row] == 1)])
        assert all(c in unsupervised for r, c in chat if r != "assistant")  # prompts are read, not trained on


def test_kd_recipe_trains_on_chat_messages(workspace, monkeypatch):
    from transformers import AutoTokenizer, LlamaForCausalLM

    from vlmdistill.recipes import load_recipe, run_recipe

    monkeypatch.chdir(workspace)
    recipe = {"plugin": "kd", "config": {"alpha": 0.5, "temperature": 2.0},
              "student": {"path": "lm-small"}, "teacher": {"path": "lm-big"},
              "data": {"builder": "conversations", "kwargs": {"path": "chats.jsonl", "max_length": 64}},
              "training": {"max_steps": 3, "per_device_train_batch_size": 4, "learning_rate": 1e-3,
                           "logging_steps": 1, "save_steps": 10, "disable_tqdm": True},
              "output_dir": "runs/kd-chat"}
    (workspace / "kd-chat.yaml").write_text(yaml.safe_dump(recipe))
    summary = run_recipe(load_recipe("kd-chat.yaml"))
    logged = [h for h in summary["log_history"] if "loss" in h]
    assert len(logged) == 3 and all(h["distill/kd"] > 0 and h["distill/task"] > 0 for h in logged)
    trained = LlamaForCausalLM.from_pretrained(summary["student"])
    before = LlamaForCausalLM.from_pretrained(workspace / "lm-small")
    assert not torch.equal(trained.lm_head.weight, before.lm_head.weight)
    assert AutoTokenizer.from_pretrained(summary["student"]).chat_template == TEMPLATE  # exported with the student
