"""The `conversations` data builder: formats, collation through real processors (LLaVA, Idefics3, Qwen2-VL built
offline), assistant-only labels, image-safe truncation, padding side, categories, and errors naming the record."""

from __future__ import annotations

import json

import pytest
import torch
import tiny_processors as tp
from PIL import Image

from vlmdistill.data.chat import ChatCollator
from vlmdistill.data.conversations import ConversationDataset
from vlmdistill.errors import ConfigError, DataError

QUESTION, ANSWER = "what is in the picture?", "there is a cat."
#: how each family's template opens and closes an assistant turn's supervised text
TURN = {"llava": ("", "<eos>"), "idefics3": (" ", "<end_of_utterance>\n"), "qwen2_vl": ("", "<|im_end|>\n")}
IMAGE_TOKEN = {"llava": "<image>", "idefics3": "<image>", "qwen2_vl": "<|image_pad|>"}


def _llava_records():
    return [
        {"id": "a", "image": "red.png", "source": "coco",
         "conversations": [{"from": "human", "value": f"<image>\n{QUESTION}"}, {"from": "gpt", "value": ANSWER}]},
        {"id": "b", "conversations": [{"from": "human", "value": "describe the sky."},
                                      {"from": "gpt", "value": "the sky is blue."},
                                      {"from": "human", "value": "and the grass?"},
                                      {"from": "gpt", "value": "green."}]},
        {"id": "c", "images": ["red.png", "big.png"], "source": "docvqa",
         "conversations": [{"from": "human", "value": "<image> and <image> how many birds are there?"},
                           {"from": "gpt", "value": "two birds."}]},
    ]


def _as_messages(record):
    roles = {"human": "user", "gpt": "assistant"}
    out = {"messages": []}
    for turn in record["conversations"]:
        pieces = turn["value"].split("<image>")
        content = []
        for i, piece in enumerate(pieces):
            if i:
                content.append({"type": "image"})
            if piece.strip():
                content.append({"type": "text", "text": piece.strip()})
        out["messages"].append({"role": roles[turn["from"]], "content": content})
    images = record.get("images") or ([record["image"]] if "image" in record else [])
    if images:
        out["images"] = images
    if "source" in record:
        out["source"] = record["source"]
    return out


@pytest.fixture
def data(tmp_path):
    Image.new("RGB", (20, 12), (200, 30, 30)).save(tmp_path / "red.png")
    Image.new("RGB", (32, 32), (30, 200, 30)).save(tmp_path / "big.png")
    records = _llava_records()
    (tmp_path / "llava.json").write_text(json.dumps(records))
    (tmp_path / "llava.jsonl").write_text("\n".join(json.dumps(r) for r in records) + "\n")
    (tmp_path / "messages.json").write_text(json.dumps([_as_messages(r) for r in records]))
    return tmp_path


def _collate(family, dataset, **kwargs):
    processor = tp.processor(family)
    return processor, ChatCollator(processor, with_categories=True, **kwargs)([dataset[i] for i in range(len(dataset))])


@pytest.mark.parametrize("family", tp.FAMILIES)
def test_real_processor_batch_trains_the_family_model_on_assistant_tokens_only(data, family):
    ds = ConversationDataset(str(data / "llava.json"), category_column="source")
    processor, batch = _collate(family, ds)
    tok = processor.tokenizer
    decoded = [tok.decode(row[row != -100]) for row in batch["labels"]]
    start, end = TURN[family]
    answers = [[ANSWER], ["the sky is blue.", "green."], ["two birds."]]
    assert decoded == ["".join(start + a + end for a in turns) for turns in answers]
    # the prompt (question, role headers) is never supervised, every supervised id is the input id there
    supervised = batch["labels"] != -100
    assert torch.equal(batch["labels"][supervised], batch["input_ids"][supervised])
    assert QUESTION not in tok.decode(batch["labels"][0][supervised[0]])
    image_id = tok.convert_tokens_to_ids(IMAGE_TOKEN[family])
    assert not supervised[batch["input_ids"] == image_id].any()
    # image-token expansion: the row with no image has none; the model accepts the batch as is
    assert (batch["input_ids"][1] == image_id).sum() == 0 and (batch["input_ids"][0] == image_id).sum() >= 4
    assert batch["dataset"] == ["coco", None, "docvqa"]
    model = tp.model_for(family, tok)
    out = model(**{k: v for k, v in batch.items() if k != "dataset"})
    assert torch.isfinite(out.loss)


def test_every_format_gives_the_same_batch(data):
    import datasets

    records = _llava_records()
    datasets.Dataset.from_list([_as_messages(r) for r in records]).save_to_disk(str(data / "saved"))
    with_images = []
    for r in records:
        m = _as_messages(r)
        m["images"] = [Image.open(data / p) for p in m.get("images", [])]
        with_images.append(m)
    embedded = datasets.Dataset.from_list(with_images)
    embedded = embedded.cast_column("images", datasets.List(datasets.Image()))
    embedded.to_parquet(str(data / "embedded.parquet"))
    (data / "parts").mkdir()
    (data / "parts" / "one.json").write_text(json.dumps(records[:2]))
    (data / "parts" / "two.jsonl").write_text(json.dumps(records[2]) + "\n")

    reference = _collate("llava", ConversationDataset(str(data / "llava.json"), category_column="source"))[1]
    for source in ("llava.jsonl", "messages.json", "saved", "embedded.parquet", "parts"):
        ds = ConversationDataset(str(data / source), category_column="source", image_root=str(data))
        batch = _collate("llava", ds)[1]
        for key in ("input_ids", "labels", "attention_mask", "pixel_values"):
            torch.testing.assert_close(batch[key], reference[key], msg=f"{source}: {key}")
        assert batch["dataset"] == ["coco", None, "docvqa"], source


@pytest.mark.parametrize("family", tp.FAMILIES)
def test_truncation_never_cuts_inside_an_image(data, family):
    """Two images in one turn; a cut inside the second image's tokens drops that image (the row ends where it
    began, the first image stays whole); a cut in the text after the images keeps both and cuts exactly there."""
    (data / "two.json").write_text(json.dumps([dict(_llava_records()[2], images=["big.png", "big.png"])]))
    item = ConversationDataset(str(data / "two.json"))[0]
    processor = tp.processor(family)
    image_id = processor.tokenizer.convert_tokens_to_ids(IMAGE_TOKEN[family])
    full = ChatCollator(processor)([item])
    ids = full["input_ids"][0]
    where = (ids == image_id).nonzero().squeeze(1)
    per_image = len(where) // 2
    second = int(where[per_image])  # first placeholder token of the second image
    model = tp.model_for(family, processor.tokenizer)

    inside = ChatCollator(processor, max_length=second + 2)([item])
    kept = inside["input_ids"][0]
    assert len(kept) <= second and (kept == image_id).sum() == per_image
    assert torch.equal(kept, ids[: len(kept)])
    model(**inside)  # pixel inputs hold exactly the kept image: the model's own count check passes

    after = ChatCollator(processor, max_length=len(ids) - 3)([item])
    assert after["input_ids"].shape[1] == len(ids) - 3 and (after["input_ids"][0] == image_id).sum() == 2 * per_image
    assert torch.equal(after["labels"][0], full["labels"][0][: len(ids) - 3])
    model(**after)


def test_padding_side(data):
    ds = ConversationDataset(str(data / "llava.json"))
    items = [ds[0], ds[1]]
    processor = tp.processor("qwen2_vl")
    right = ChatCollator(processor, padding_side="right")(items)
    left = ChatCollator(processor, padding_side="left")(items)
    short = int(right["attention_mask"][1].sum())
    assert right["attention_mask"][1, :short].all() and not right["attention_mask"][1, short:].any()
    assert left["attention_mask"][1, -short:].all() and not left["attention_mask"][1, :-short].any()
    for key in ("input_ids", "labels", "mm_token_type_ids"):
        assert torch.equal(left[key][1, -short:], right[key][1, :short])
    assert (right["labels"][1, short:] == -100).all() and (left["labels"][1, :-short] == -100).all()
    with pytest.raises(ConfigError, match="padding_side must be one of"):
        ChatCollator(processor, padding_side="middle")


def test_bad_records_are_named_by_file_and_index(data):
    records = _llava_records()

    def write(name, content):
        (data / name).write_text(content if isinstance(content, str) else json.dumps(content))
        return str(data / name)

    missing = records[:1] + [dict(records[2], images=["red.png", "nowhere.png"])]
    with pytest.raises(DataError, match=r"missing.json, record 1: image .*nowhere.png does not exist"):
        ConversationDataset(write("missing.json", missing))
    with pytest.raises(DataError, match=r"marks.json, record 0: 2 image placeholder\(s\) in the text but 1 image"):
        ConversationDataset(write("marks.json", [dict(records[2], images=["red.png"])]))
    with pytest.raises(DataError, match=r"role.json, record 1: conversations\[0\] has from='robot'; valid: human"):
        ConversationDataset(write("role.json", [records[0], {"conversations": [{"from": "robot", "value": "x"}]}]))
    with pytest.raises(DataError, match=r"keys.json, record 0: a record needs `conversations` .* or `messages`"):
        ConversationDataset(write("keys.json", [{"text": "hello"}]))
    with pytest.raises(DataError, match=r"bad.jsonl, record 1 \(line 3\): not valid JSON"):
        ConversationDataset(write("bad.jsonl", json.dumps(records[0]) + "\n\n{oops\n"))
    with pytest.raises(DataError, match=r"notjson.json: not valid JSON"):
        ConversationDataset(write("notjson.json", "[{"))
    (data / "broken.png").write_bytes(b"not an image")
    ds = ConversationDataset(write("broken.json", [records[1], dict(records[0], image="broken.png")]))
    with pytest.raises(DataError, match=r"broken.json, record 1: cannot read image .*broken.png"):
        ds[1]
    with pytest.raises(DataError, match="does not exist"):
        ConversationDataset(str(data / "absent.json"))


def test_samples_without_a_category_follow_kd_by_default(data):
    """`source` feeds lingudistill's dataset_categories; the record without one follows kd_by_default."""
    import vlmdistill

    lm_tok = tp.lm_tokenizer()
    tok = tp.student_tokenizer("llava", lm_tok)
    processor = tp.processor("llava", tok)
    student = tp.model_for("llava", tok)
    teacher = tp.teacher_for(student, lm_tok)
    ds = ConversationDataset(str(data / "llava.json"), category_column="source")
    batch = ChatCollator(processor, with_categories=True)([ds[i] for i in range(3)])
    for default, expected in ((True, [True, True, False]), (False, [True, False, False])):
        wrapped = vlmdistill.wrap(student, plugin="lingudistill", teacher=teacher, kd_by_default=default,
                                  dataset_categories={"coco": "captioning", "docvqa": "documents"},
                                  student_processor=processor, teacher_tokenizer=lm_tok)
        plan = wrapped.plugin.plan({k: v for k, v in batch.items() if k != "dataset"}, {"dataset": batch["dataset"]})
        assert plan.kd_mask.tolist() == expected
        vlmdistill.unwrap(wrapped)


def test_processor_token_attributes_are_read_as_visual_ids():
    from vlmdistill.plugins.lingudistill.families import processor_visual_ids, visual_token_ids

    processor = tp.processor("idefics3")
    tok = processor.tokenizer
    ids = {i for values in processor_visual_ids(processor).values() for i in values}
    names = ["<image>", "<fake_token_around_image>", "<global-img>", "<row_1_col_1>", "<row_6_col_6>"]
    assert {tok.convert_tokens_to_ids(n) for n in names} <= ids
    assert tok.convert_tokens_to_ids("<end_of_utterance>") not in ids
    student = tp.model_for("idefics3", tok)
    assert ids <= visual_token_ids(student, processor=processor)
    qwen = tp.processor("qwen2_vl")
    assert {qwen.tokenizer.convert_tokens_to_ids(t) for t in ("<|image_pad|>", "<|video_pad|>")} <= \
        {i for values in processor_visual_ids(qwen).values() for i in values}


@pytest.mark.parametrize("family", tp.FAMILIES)
def test_lingudistill_on_real_processor_batches(data, family):
    """Processor-made batches (tiles, mRoPE positions, structure tokens): a teacher holding the student LM's
    weights reproduces the student's logits at every distilled row, and every token the processor wrote for an
    image is shared, never distilled."""
    import vlmdistill
    from contract_cases.lingudistill import language_model_copy

    processor = tp.processor(family)
    tok = processor.tokenizer
    student = tp.model_for(family, tok, seed=1, dtype=torch.float64).eval()
    teacher = language_model_copy(student)
    ds = ConversationDataset(str(data / "llava.json"))
    batch = ChatCollator(processor, padding_side="left")([ds[i] for i in range(3)])
    batch = {k: v.double() if v.is_floating_point() else v for k, v in batch.items()}
    wrapped = vlmdistill.wrap(student, plugin="lingudistill", teacher=teacher, student_processor=processor)
    got = wrapped.plugin.paired_logits(student, batch)
    assert got["rows"].shape[0] == int((batch["labels"][:, 1:] != -100).sum())
    torch.testing.assert_close(got["teacher"], got["student"], rtol=1e-9, atol=1e-10)
    plan = wrapped.plugin.plan({k: v for k, v in batch.items()}, {})
    image_tokens = {t for t in tok.get_vocab() if t.startswith(("<fake", "<row_", "<global", "<image", "<|vision",
                                                                 "<|image"))}
    written = torch.isin(batch["input_ids"], torch.tensor([tok.convert_tokens_to_ids(t) for t in image_tokens]))
    assert written.any() and plan.unreadable[written].all() and not plan.distilled[written].any()
    vlmdistill.unwrap(wrapped)


def test_a_text_lm_tokenizer_collates_text_only_conversations(data):
    """A plain tokenizer (no image processor) with a string-content chat template: labels on assistant turns,
    a pad token supplied when the tokenizer has none, and image records refused naming the record."""
    tok = tp.lm_tokenizer()
    tok.pad_token = None
    tok.chat_template = ("{% for m in messages %}<bos>{{ m['role'] }}: {{ m['content'] }}<eos>{% endfor %}"
                         "{% if add_generation_prompt %}<bos>assistant: {% endif %}")
    ds = ConversationDataset(str(data / "llava.json"))
    batch = ChatCollator(tok)([ds[1]])
    labels = batch["labels"][0]
    assert tok.decode(labels[labels != -100]) == "the sky is blue.<eos>green.<eos>"
    assert tok.decode(batch["input_ids"][0]).startswith("<bos>user: describe the sky.<eos><bos>assistant: ")
    with pytest.raises(DataError, match="llava.json, record 0: the sample has images but .* has no image processor"):
        ChatCollator(tok)([ds[0]])
