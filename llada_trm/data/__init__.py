"""The data path: reasoning records -> tokenised chunk layout -> masked batches.

`sources` reads the synthetic set, local files or the Hub; `chat_spans` finds the assistant span of chat data;
`records` turns one record into prompt and reasoning ids; `dataset` lays them out as docs/architecture.md §2
says (`layout` holds the marker and the text templates); `collator` pads and masks whole reasoning chunks.
Hands on: batches with `input_ids`, `attention_mask`, `labels`, `chunk_index` and `chunk_is_masked`.
"""
