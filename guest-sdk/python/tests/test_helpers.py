"""The pure helpers agree with the Rust SDK's (the same cases as
guest-sdk/src/answer.rs and config.rs), so Python and Rust strategies read,
normalise and count answers alike. Run: python -m unittest discover -s
guest-sdk/python/tests -t guest-sdk/python
"""

import unittest

from tessera_sdk.answer import choice, extract, f1, is_correct, last_boxed, normalize, plurality, vote
from tessera_sdk.config import Config, ConfigError

OPTS = ["Paris", "Lyon", "Marseille", "Nice"]


class Answers(unittest.TestCase):
    def test_boxed_keeps_nested_braces_and_takes_the_last(self):
        self.assertEqual(last_boxed(r"so \boxed{\frac{1}{2}} done"), r"\frac{1}{2}")
        self.assertEqual(last_boxed(r"\boxed{1} then \boxed{2}"), "2")
        self.assertEqual(last_boxed(r"\box{7}"), "7")
        self.assertIsNone(last_boxed(r"\boxed{unclosed"))

    def test_extract_prefers_box_then_answer_is_then_first_line(self):
        self.assertEqual(extract("Work... The answer is **Paris**."), "Paris")
        self.assertEqual(extract("Final Answer: 42\nmore"), "42")
        self.assertEqual(extract("Paris.\nIt is the capital."), "Paris")
        self.assertEqual(extract(r"x \boxed{12} and the answer is 13"), "12")

    def test_normalize_is_squad_style(self):
        self.assertEqual(normalize("The  Eiffel-Tower!"), "eiffel tower")
        self.assertEqual(normalize("an Apple"), "apple")

    def test_vote_counts_normal_forms_and_breaks_ties_by_priority(self):
        a = ["Paris", "paris.", "Lyon", "", "Lyon"]
        t = vote(a)
        self.assertEqual((t.answer, t.votes, t.winner), ("paris", 2, 0))
        self.assertEqual(vote(a, [5, 5, 0, 5, 5]).answer, "lyon")
        self.assertIsNone(vote([""]))

    def test_sentences_vote_for_the_bare_answer_they_end_with(self):
        t = vote(["The capital of France is Paris", "Paris", "Lyon", "paris."])
        self.assertEqual((t.answer, t.votes), ("paris", 3))
        self.assertEqual(vote(["It is Paris", "Lyon"]).answer, "it is paris")

    def test_choice_reads_a_leading_letter_or_an_answer_marker(self):
        self.assertEqual(choice("B", OPTS), 1)
        self.assertEqual(choice("(C) Marseille", OPTS), 2)
        self.assertEqual(choice("d.", OPTS), 3)
        self.assertEqual(choice("A) Paris", OPTS), 0)
        self.assertEqual(choice("I think the answer is C.", OPTS), 2)
        self.assertEqual(choice("Answer: b", OPTS), 1)
        self.assertEqual(choice("It must be Lyon.", OPTS), 1)
        self.assertIsNone(choice("Paris or Lyon", OPTS))
        self.assertIsNone(choice("A city in the south", OPTS))
        self.assertIsNone(choice("E", OPTS))
        self.assertIsNone(choice("Because", OPTS))

    def test_plurality_counts_letters_exactly_and_keeps_the_first_of_equals(self):
        o = ["red", "blue", "green"]
        self.assertEqual(plurality(["B) blue", None, "C", "B"], o), ("B", 0))
        self.assertEqual(plurality(["C", "A"], o), ("C", 0))
        self.assertIsNone(plurality([None, "nothing"], o))
        self.assertEqual(plurality(["The capital is Paris", "Paris", "Lyon"]), ("paris", 0))

    def test_is_correct_handles_letters_texts_and_numbers(self):
        self.assertTrue(is_correct("B) Lyon", "B", OPTS))
        self.assertTrue(is_correct("Lyon", "Lyon", OPTS))
        self.assertFalse(is_correct("A", "B", OPTS))
        self.assertTrue(is_correct("The answer is 4.0", "4"))
        self.assertTrue(is_correct(r"so \boxed{1,200}", "1200"))
        self.assertTrue(is_correct("The capital of France is Paris.", "Paris"))
        self.assertFalse(is_correct("Lyon", "Paris"))
        self.assertFalse(is_correct("anything", ""))

    def test_numbers_keep_their_sign_and_decimals_and_odd_letters_do_not_panic(self):
        self.assertTrue(is_correct("İİİ The answer is 4", "4"))
        self.assertEqual(extract("İİ ANSWER: Paris"), "Paris")
        self.assertFalse(is_correct("The answer is 18.75.", "18"))
        self.assertTrue(is_correct("The answer is 18.75.", "18.75"))
        self.assertFalse(is_correct("The answer is 3", "-3"))
        self.assertTrue(is_correct("The answer is -3. Done", "-3"))
        self.assertTrue(is_correct("She pays $1,600 in all", "1,600"))
        self.assertTrue(is_correct("so 12 - 4 = 8", "8"))
        self.assertFalse(is_correct("The answer is twenty", "20"))
        self.assertTrue(is_correct("The answer is 2, 3", "2,3"))
        self.assertFalse(is_correct("The answer is 23", "2,3"))

    def test_the_words_i_and_a_are_not_options(self):
        o = [f"option text {i}" for i in range(13)]
        self.assertEqual(choice("I think the answer is B", o), 1)
        self.assertIsNone(choice("I'm not sure", o))
        self.assertIsNone(choice("i guess so", o))
        self.assertEqual(choice("I", o), 8)
        self.assertEqual(choice("I) option text 8", o), 8)
        self.assertEqual(choice("(I)", o), 8)

    def test_f1_is_squad_token_overlap(self):
        self.assertEqual(f1("The Eiffel Tower", "eiffel tower"), 1.0)
        self.assertEqual(f1("Paris", "Lyon"), 0.0)
        self.assertAlmostEqual(f1("the tower in paris", "eiffel tower"), 0.4)
        self.assertEqual(f1("", ""), 1.0)


class Configs(unittest.TestCase):
    def test_the_last_value_wins_and_types_follow_the_default(self):
        c = Config([("k", "3"), ("k", "7"), ("t", "0.5"), ("on", "yes")])
        self.assertEqual(c.parse("k", 5), 7)
        self.assertEqual(c.parse("t", 1.0), 0.5)
        self.assertEqual(c.parse("missing", 9), 9)
        self.assertIs(c.parse("on", False), True)

    def test_bad_values_name_the_key_the_value_and_the_fix(self):
        c = Config([("k", "many"), ("t", "3"), ("w", "1,2")])
        with self.assertRaisesRegex(ConfigError, r"config `k` = `many` is not a valid integer"):
            c.parse("k", 5)
        with self.assertRaisesRegex(ConfigError, r"config `t` = `3.0`: use 0 \(greedy\) to 2"):
            c.parse_within("t", 0.7, 0.0, 2.0, "use 0 (greedy) to 2")
        with self.assertRaisesRegex(ConfigError, r"give 3 numbers, one per member \(got 2\)"):
            c.numbers("w", 3, "member")
        self.assertEqual(Config([("w", "1, 2.5")]).numbers("w", 2, "member"), [1.0, 2.5])


if __name__ == "__main__":
    unittest.main()


class States(unittest.TestCase):
    def test_postcard_matches_the_rust_encoding(self):
        from tessera_sdk import state
        from tessera_sdk.dev import MemberScore

        def write(w):
            w.seq(["ab"], lambda w, s: w.string(s))
            w.seq([MemberScore("ab", [True, False])], lambda w, s: s.write(w))

        data = state.save(1, write)
        # version, 1 id, "ab", 1 score: "ab", 2 booleans.
        self.assertEqual(data, bytes([1, 1, 2, 97, 98, 1, 2, 97, 98, 2, 1, 0]))
        back = state.load(1, data, lambda r: (r.seq(lambda r: r.string()), r.seq(MemberScore.read)))
        self.assertEqual(back, (["ab"], [MemberScore("ab", [True, False])]))
        self.assertEqual(bytes(state.Writer().varint(300).out), bytes([0xAC, 0x02]))
        self.assertIsNone(state.load(1, None, lambda r: r.string()))
        with self.assertRaisesRegex(ConfigError, "not version 1; run fit again"):
            state.load(1, bytes([2, 0]), lambda r: r.string())
        with self.assertRaisesRegex(ConfigError, "does not decode"):
            state.load(1, bytes([1, 5, 97]), lambda r: r.string())
