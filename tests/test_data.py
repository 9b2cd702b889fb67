"""kdkit.data.rows: formats, masks, truncation, and errors that name file, line and field."""

from __future__ import annotations

import pytest
import torch

from kdkit.data.rows import DataError, collate, data_fingerprint, load_dataset, read_examples, tokenize_rows
from kdkit.demo.tokenizer import build_char_tokenizer
from tests.helpers import save_model_dir, toy_rows, write_jsonl

TOK = build_char_tokenizer()


def _decode(ids):
    return TOK.decode(ids, skip_special_tokens=False)


def test_prompt_completion_masks_the_completion_and_eos(tmp_path):
    f = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "ab", "completion": "cd", "role": "anchor", "task": "HE/1",
                                            "weight": 2}])
    rows, rep = load_dataset(TOK, f, max_length=64)
    r = rows[0]
    assert _decode(r.input_ids) == "<s>abcd</s>"
    assert r.loss_mask == [False, False, False, True, True, True]
    assert (r.role, r.task, r.weight, r.line) == ("anchor", "HE/1", 2.0, 1)
    assert r.loss_positions().tolist() == [2, 3, 4]
    assert rep.target_tokens == 3


def test_messages_mask_assistant_turns_only(tmp_path):
    msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"},
            {"role": "user", "content": "more"}, {"role": "assistant", "content": "ok"}]
    f = write_jsonl(tmp_path / "d.jsonl", [{"messages": msgs}])
    (r,), _ = load_dataset(TOK, f, max_length=256)
    targets = "".join(_decode([i]) for i, m in zip(r.input_ids, r.loss_mask, strict=True) if m)
    assert targets == "yo</s>ok</s>"


def test_text_rows_train_on_every_token(tmp_path):
    f = write_jsonl(tmp_path / "d.jsonl", [{"text": "hello"}])
    (r,), _ = load_dataset(TOK, f, max_length=64)
    assert r.n_targets == 5  # every token after BOS


def test_truncation_is_counted_and_empty_rows_reported(tmp_path):
    f = write_jsonl(tmp_path / "d.jsonl", [
        {"prompt": "x" * 20, "completion": "yz"},  # completion cut away entirely
        {"prompt": "ab", "completion": "c" * 20},  # truncated but keeps targets
        {"prompt": "ab", "completion": ""},  # empty completion
        {"prompt": "ab", "completion": "cd"},
    ])
    rows, rep = load_dataset(TOK, f, max_length=10, truncation="right")
    assert rep.rows == 2 and rep.truncated == 1 and rep.empty == [1, 3]
    assert all(len(r.input_ids) <= 10 for r in rows)
    with pytest.raises(DataError, match=r"d.jsonl:1: field 'completion': no target token \(after truncation"):
        load_dataset(TOK, f, max_length=10, on_empty="error", truncation="right")
    # the default keeps the completion: the oldest prompt tokens go, the BOS stays
    rows, rep = load_dataset(TOK, f, max_length=10)
    assert rep.rows == 3 and rep.truncated == 2 and rep.empty == [3]
    assert _decode(rows[0].input_ids) == "<s>xxxxxxyz</s>"
    assert rows[0].loss_mask == [False] * 7 + [True] * 3
    assert _decode(rows[1].input_ids) == "<s>" + "c" * 8 + "</s>" and all(rows[1].loss_mask[1:])
    assert "2 truncated to 10 tokens (left: oldest tokens dropped)" in rep.summary(10)


@pytest.mark.parametrize(
    "line, match",
    [
        ('{"prompt": "a"}', r"d.jsonl:2: field '<format>': a row needs exactly one of"),
        ('{"prompt": "a", "completion": 5}', r"d.jsonl:2: field 'completion': expected a string"),
        ('{"messages": [{"role": "user"}]}', r"d.jsonl:2: field 'messages\[0\]'"),
        ('{"text": "a", "weight": -1}', r"d.jsonl:2: field 'weight': expected a finite number >= 0"),
        ('{"text": "a", "role": ""}', r"d.jsonl:2: field 'role'"),
        ('{"text": "a", "task": 3}', r"d.jsonl:2: field 'task'"),
        ('[1, 2]', r"d.jsonl:2: field '<row>': expected a JSON object"),
        ('{"text": "a",', r"d.jsonl:2: not valid JSON"),
        ('{"prompt": "a", "response": "b"}', r"d.jsonl:2: field 'response': kdkit does not read 'response'; rename it "
                                             r"to 'completion'"),
        ('{"instruction": "a", "completion": "b"}', r"d.jsonl:2: field 'instruction': .* rename it to 'prompt'"),
        ('{"conversations": []}', r"d.jsonl:2: field 'conversations': .* rename it to 'messages'"),
        ('{"messages": [{"role": "human", "content": "hi"}]}',
         r"d.jsonl:2: field 'messages\[0\].role': unknown role 'human' \(did you mean 'user'\?\); a chat turn's role "
         r"is one of: system, user, assistant, tool"),
        ('{"messages": [{"role": "user", "content": "hi"}, {"role": "critic", "content": "no"}]}',
         r"field 'messages\[1\].role': unknown role 'critic'; a chat turn's role is one of"),
    ],
)
def test_malformed_rows_name_file_line_field(tmp_path, line, match):
    f = tmp_path / "d.jsonl"
    f.write_text('{"text": "fine"}\n' + line + "\n")
    with pytest.raises(DataError, match=match):
        read_examples(f)


def test_missing_and_empty_files(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        read_examples(tmp_path / "nope.jsonl")
    (tmp_path / "e.jsonl").write_text("\n\n")
    with pytest.raises(DataError, match="no rows"):
        read_examples(tmp_path / "e.jsonl")


def test_collate_shifts_targets_and_pads(tmp_path):
    f = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "a", "completion": "bc"}, {"prompt": "abcd", "completion": "e"}])
    rows, _ = load_dataset(TOK, f, max_length=64)
    b = collate(rows, TOK.pad_token_id)
    assert b.input_ids.shape == (2, 7) and b.targets.shape == (2, 6)
    assert b.attention_mask[0].tolist() == [1, 1, 1, 1, 1, 0, 0]
    # targets[t] is the token at t+1 when it is a target
    ids0 = rows[0].input_ids
    assert b.targets[0].tolist() == [-100, ids0[2], ids0[3], ids0[4], -100, -100]
    assert torch.equal(b.weights, torch.ones(2))


def test_fingerprint_changes_with_ids_or_mask(tmp_path):
    f = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "ab", "completion": "cd"}])
    rows, _ = tokenize_rows(TOK, f, read_examples(f), max_length=64)
    fp = data_fingerprint(rows)
    rows[0].loss_mask[1] = True
    assert data_fingerprint(rows) != fp


def test_non_utf8_bytes_name_file_and_line(tmp_path):
    f = tmp_path / "d.jsonl"
    f.write_bytes(b'{"text": "fine"}\n{"text": "caf\xe9"}\n')
    with pytest.raises(DataError, match=r"d.jsonl:2: not UTF-8 text \(byte 0xe9 at column 14\)"):
        read_examples(f)
    import gzip

    g = tmp_path / "d.jsonl.gz"
    g.write_bytes(gzip.compress(b'{"text": "fine"}\n')[:-6])  # truncated archive
    with pytest.raises(DataError, match=r"d.jsonl.gz: cannot be read"):
        read_examples(g)


def _merging_tokenizer():
    """A tokenizer whose vocabulary has one token spanning the assistant header and the answer's
    indentation (as SmolLM2's merges "assistant\\n" with the first line's spaces): the rendered turns
    are prefixes as text, not as tokens."""
    from tokenizers import AddedToken

    tok = build_char_tokenizer()
    tok.add_tokens([AddedToken("assistant:\n    ", normalized=False)])
    return tok


def test_messages_whose_header_merges_with_the_answer_train_on_exactly_the_assistant_spans(tmp_path):
    tok = _merging_tokenizer()
    msgs = [{"role": "user", "content": "write f"}, {"role": "assistant", "content": "    return 1"},
            {"role": "user", "content": "and g"}, {"role": "assistant", "content": "    return 2"}]
    f = write_jsonl(tmp_path / "d.jsonl", [{"messages": msgs}])
    (r,), _ = load_dataset(tok, f, max_length=512)
    pieces = [tok.decode([i], skip_special_tokens=False) for i in r.input_ids]
    merged = [i for i, p in enumerate(pieces) if p == "assistant:\n    "]
    assert len(merged) == 2  # the merge happened in both turns: a token-prefix rule could not locate them
    # spans by characters: each answer's text (and its end-of-turn token) exactly, plus the straddling token
    targets = [i for i, m in enumerate(r.loss_mask) if m]
    expected = set()
    for start in merged:
        end = start + 1
        while pieces[end] != "</s>":
            end += 1
        expected |= set(range(start, end + 1))
    assert targets == sorted(expected)
    assert "".join(pieces[i] for i in targets) == "assistant:\n    return 1</s>assistant:\n    return 2</s>"


def _table_files(tmp_path, rows):
    """The same rows as JSONL, Parquet, JSON, Arrow (a save_to_disk directory) and, for flat rows, CSV."""
    import datasets

    write_jsonl(tmp_path / "rows.jsonl", rows)
    columns = sorted({k for r in rows for k in r})  # a table has every column; a row's unused cells are empty
    ds = datasets.Dataset.from_list([{k: r.get(k) for k in columns} for r in rows])
    ds.to_parquet(str(tmp_path / "rows.parquet"))
    ds.to_json(str(tmp_path / "rows.json"))
    ds.save_to_disk(str(tmp_path / "saved"))
    files = [tmp_path / "rows.parquet", tmp_path / "rows.json", tmp_path / "saved"]
    if all(isinstance(v, str | int | float) for r in rows for v in r.values()) and len(columns) == len(rows[0]):
        ds.to_csv(str(tmp_path / "rows.csv"), index=False)
        files.append(tmp_path / "rows.csv")
    return tmp_path / "rows.jsonl", files


def test_parquet_json_csv_and_saved_datasets_read_as_their_jsonl(tmp_path):
    flat = [{"prompt": f"p{i} ", "completion": f"c{i}", "role": "anchor" if i % 2 else "new", "task": f"T/{i}",
             "weight": 1.0 + i} for i in range(5)]
    chats = [{"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}]}
             for i in range(3)] + [{"text": "plain text row"}]
    for k, rows in enumerate((flat, chats)):
        (tmp_path / str(k)).mkdir()
        jsonl, tables = _table_files(tmp_path / str(k), rows)
        want, _ = load_dataset(TOK, jsonl, max_length=64)
        for f in tables:
            got, _ = load_dataset(TOK, f, max_length=64)
            assert [(r.input_ids, r.loss_mask, r.role, r.task, r.weight, r.line) for r in got] == \
                   [(r.input_ids, r.loss_mask, r.role, r.task, r.weight, r.line) for r in want], f
            assert data_fingerprint(got) == data_fingerprint(want)


def test_a_table_row_error_names_the_file_the_row_and_the_field(tmp_path):
    import datasets

    rows = [{"prompt": "a", "completion": "b", "weight": 1.0}, {"prompt": "a", "completion": "b", "weight": -2.0}]
    datasets.Dataset.from_list(rows).to_parquet(str(tmp_path / "bad.parquet"))
    with pytest.raises(DataError, match=r"bad.parquet:2: field 'weight': expected a finite number >= 0"):
        read_examples(tmp_path / "bad.parquet")
    (tmp_path / "plain").mkdir()
    with pytest.raises(DataError, match="a directory that Dataset.save_to_disk did not write"):
        read_examples(tmp_path / "plain")
    (tmp_path / "broken.parquet").write_bytes(b"not parquet")
    with pytest.raises(DataError, match="broken.parquet: cannot be read as .parquet"):
        read_examples(tmp_path / "broken.parquet")


def test_the_same_rows_from_parquet_make_the_same_cache_bytes(tmp_path):
    from kdkit.teacher.cache.precompute import PrecomputeSettings, precompute

    teacher = save_model_dir(tmp_path / "teacher")
    jsonl, tables = _table_files(tmp_path, toy_rows(10))
    s = PrecomputeSettings(top_k=8, shard_rows=4)
    a = precompute(teacher, jsonl, tmp_path / "from-jsonl", s, progress=False, log=lambda m: None)
    b = precompute(teacher, tables[0], tmp_path / "from-parquet", s, progress=False, log=lambda m: None)
    assert a["key"] == b["key"]
    for shard in a["shards"]:
        one, other = (tmp_path / d / shard["file"] for d in ("from-jsonl", "from-parquet"))
        assert one.read_bytes() == other.read_bytes()


TOOL_TEMPLATE = (  # a chat template with a tools block and tool calls (none of the offline tokenizers has one)
    "{% if tools %}<s>tools:\n{% for t in tools %}{{ t['function']['name'] }}\n{% endfor %}</s>{% endif %}"
    "{% for m in messages %}<s>{{ m['role'] }}:\n"
    "{% for c in m.get('tool_calls') or [] %}call {{ c['function']['name'] }}"
    "({{ c['function']['arguments'] | tojson }})\n{% endfor %}{{ m['content'] }}</s>{% endfor %}"
    "{% if add_generation_prompt %}<s>assistant:\n{% endif %}"
)


def test_chats_with_tools_target_the_assistants_calls_and_answers_not_the_tool_outputs(tmp_path):
    tok = build_char_tokenizer()
    tok.chat_template = TOOL_TEMPLATE
    call = {"type": "function", "function": {"name": "add", "arguments": {"a": 2, "b": 3}}}
    tools = [{"type": "function", "function": {"name": "add", "parameters": {"type": "object"}}}]
    row = {"messages": [{"role": "user", "content": [{"type": "text", "text": "2+3"}, {"type": "text", "text": "?"}]},
                        {"role": "assistant", "content": None, "tool_calls": [call]},
                        {"role": "tool", "content": "5"},
                        {"role": "assistant", "content": "it is 5"}], "tools": tools}
    f = write_jsonl(tmp_path / "tools.jsonl", [row])
    (r,), _ = load_dataset(tok, f, max_length=256)
    text = tok.decode(r.input_ids)
    assert text.startswith("<s>tools:\nadd\n</s><s>user:\n2+3?</s>")  # the tools block, the parts joined
    targets = "".join(tok.convert_ids_to_tokens(i) for i, m in zip(r.input_ids, r.loss_mask, strict=True) if m)
    assert targets == 'call add({"a": 2, "b": 3})\n</s>it is 5</s>'  # the calls and the answer; never "5" of the tool
    bad = {**row, "messages": [{"role": "user", "content": [{"type": "image", "url": "x"}]}]}
    with pytest.raises(DataError, match=r"tools.jsonl:1: field 'messages\[0\].content': a list of parts must hold text"):
        read_examples(write_jsonl(tmp_path / "tools.jsonl", [bad]))
    with pytest.raises(DataError, match="field 'tools': expected a list of tool definitions"):
        read_examples(write_jsonl(tmp_path / "tools.jsonl", [{**row, "tools": "add"}]))
