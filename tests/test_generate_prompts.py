"""The --prompts_file reader of ``generate``: records in order, errors that name the line."""

import pytest

from astrollama_jax.commands import generate


def test_reads_records_and_skips_blank_lines(tmp_path):
  path = tmp_path / "p.jsonl"
  path.write_text('{"prompt": "a", "id": 1}\n\n{"prompt": "b"}\n', encoding="utf-8")
  assert generate._read_prompts_file(str(path)) == [{"prompt": "a", "id": 1}, {"prompt": "b"}]


@pytest.mark.parametrize(
  "text, message",
  [
    ('{"prompt": "a"}\n{oops\n', r"p.jsonl:2: not JSON"),
    ('{"prompt": "a"}\n{"text": "b"}\n', r"p.jsonl:2: expected an object with a string field"),
    ('["a"]\n', r"p.jsonl:1: expected a JSON object"),
    ("\n\n", r"p.jsonl: no prompts"),
  ],
)
def test_bad_files_name_the_line(tmp_path, text, message):
  path = tmp_path / "p.jsonl"
  path.write_text(text, encoding="utf-8")
  with pytest.raises(ValueError, match=message):
    generate._read_prompts_file(str(path))
