"""bench/answer_position.py: answers placed by position, accuracy pooled per quarter of the context."""

import importlib.util
import os

_PATH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench", "answer_position.py")
_spec = importlib.util.spec_from_file_location("answer_position", _PATH)
answer_position = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(answer_position)  # stdlib only at import


def test_answer_start_finds_the_first_occurrence_of_the_whole_span():
    assert answer_position.answer_start([5, 1, 2, 9, 1, 2, 3], [1, 2, 3]) == 4  # [1, 2] at 1 is not the span
    assert answer_position.answer_start([1, 2], [1, 2, 3]) is None


def test_accuracy_is_pooled_per_quarter_and_the_last_position_falls_in_the_last_quarter():
    positions = {0: 0.0, 1: 0.1, 2: 0.3, 3: 0.99, 4: 1.0, 5: 0.6}
    rows = {0: (1, 0.5), 1: (0, 0.5), 2: (1, 0.5), 3: (1, 0.5), 4: (0, 0.5), 9: (1, 0.5)}  # 9 has no position
    assert answer_position.by_quarter(rows, positions) == [[1, 2], [1, 1], [0, 0], [1, 2]]


def test_a_recency_window_answers_the_full_caches_right_answers_inside_it():
    positions = {0: 0.1, 1: 0.8, 2: 0.9, 3: 0.95}
    full = {0: (1, 1.0), 1: (1, 1.0), 2: (0, 1.0), 3: (1, 1.0)}
    # last 25%: prompts 1 (0.8), 2 (0.9, full cache wrong) and 3 (0.95) start inside; 1 and 3 are right
    assert answer_position.window_explains(full, positions, 0.25, [0, 1, 2, 3]) == 0.5
    assert answer_position.window_explains(full, positions, 0.1, [0, 1, 2, 3]) == 0.25
