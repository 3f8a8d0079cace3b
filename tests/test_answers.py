import pytest

from datamodules.corpus.answers import check_answer, normalize_answer, number_to_words


@pytest.mark.parametrize(
    ("text", "tokens"),
    [
        ("Twenty three apples", ["23", "apples"]),
        ("one hundred and five", ["105"]),
        ("nine hundred ninety nine", ["999"]),
        ("three five", ["3", "5"]),  # two numbers said in a row stay two numbers
        ("forty-two.", ["42"]),
        ("It's 1,000!", ["it's", "1000"]),
    ],
)
def test_normalize(text, tokens):
    assert normalize_answer(text) == tokens


def test_number_words_round_trip():
    for n in range(1000):
        assert normalize_answer(number_to_words(n)) == [str(n)]


def test_numbers_as_digits_or_words():
    assert check_answer("Three plus five is eight.", ["8"])
    assert check_answer("three plus five is 8", ["eight"])
    assert not check_answer("Three plus five is nine.", ["8"])


def test_numeric_answer_must_be_the_last_number():
    # echoing an operand equal to the gold answer is not a correct answer
    assert not check_answer("Five minus zero is zero.", ["5"])
    assert check_answer("Five minus zero is five.", ["5"])
    assert not check_answer("I do not know.", ["5"])


def test_words_contained_case_and_punctuation_insensitive():
    assert check_answer("The capital of France is PARIS!", "paris")
    assert check_answer("The day after Monday is Tuesday.", ["Tuesday"])
    assert not check_answer("The day after Monday is Wednesday.", ["Tuesday"])
    assert not check_answer("Parisian food", ["Paris"])  # whole words only
    assert check_answer("it is New York", ["new york"])


def test_any_gold_counts_and_bad_gold_is_an_error():
    assert check_answer("It is grey.", ["gray", "grey"])
    with pytest.raises(ValueError):
        check_answer("anything", [])
    with pytest.raises(ValueError):
        check_answer("anything", ["?!"])


def test_days_and_months_must_be_the_last_one_named():
    steps = "Before Thursday come Wednesday, Tuesday and Monday, so three days before Thursday is {}."
    assert check_answer(steps.format("Monday"), ["Monday"])
    assert not check_answer(steps.format("Tuesday"), ["Monday"])  # Monday only appears as a step
    assert check_answer("Before Thursday come Wednesday, Tuesday and Monday.", ["Monday"])
    assert check_answer("The month before March is February.", ["February"])
    assert not check_answer("After January comes February, so it is March.", ["February"])
