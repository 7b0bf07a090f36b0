"""The demo models' vocabulary and the check that a vocabulary fits a model.

:func:`generate_vocab` is Google's uncased layout (:mod:`bertpool.common.vocab`, which
also reads and writes vocab.txt) with a deterministic body: single characters, ``##``
continuations, common English words, letter bigrams/trigrams (so unknown words split
into a few pieces instead of single characters), then ``[unusedK]`` filler.
"""

from __future__ import annotations

import itertools
import logging
import pathlib
import string

from ..common.cli import counted
from ..common.errors import ConfigError, ModelFormatError
from ..common.vocab import HEAD, REQUIRED_TOKENS, bert_vocab, read_vocab

# Common English words (lower case). Part of the deterministic demo vocabulary;
# changing this list changes every generated demo model.
COMMON_WORDS = """
the of and to a in is was for that on as with by he at from his it an were are
which this be or has had not but have after its also first one new their they two
been who all would she more other her will when there we into said about year can
than up only time out some no could so over these most then may him people what
many three state world during our years between made where like city company
government before while did back since being through under later both percent
million four including well school because such university around if second
national team family group last them part day against those each us work just
season five home any week public part since long same several make used off
american early known last south north even best area because high life market
day end show general next among much left set according called law million
country found began including group house service until however early along
without very high own based found united how report old still percent system
quarter shares price prices stock stocks sales revenue profit net income billion
share investors bank analysts trading rose fell points index dollar oil
officials police court judge case charges trial federal minister president
prime leader party election vote told statement spokesman chief executive
officer board deal agreement plan plans program security military war forces
killed attack people health drug study patients hospital news reported reports
monday tuesday wednesday thursday friday saturday sunday january february march
april may june july august september october november december today yesterday
tomorrow week month months weeks days hours said says say saying added expected
announced according declined increased decreased higher lower lost gained
closed opened cut rise fall growth economy economic financial business industry
technology software computer internet microsoft apple google network data
online users customers product products sold buy bought sell offer
he she they it i you we me him her them my your his its our their this that these
those who whom whose what which when where why how all any both each few more most
other some such no nor not only own same so than too very can will just should now
is are was were be been being have has had do does did doing a an the and but if or
because as until while of at by for with about against between into through during
before after above below to from up down in out on off over under again further
then once here there would could might must shall
good great little big small large long short right wrong true false full empty
man woman men women child children boy girl father mother son daughter friend
water food money car road street town village country land sea river air fire
""".split()


def generate_vocab(size: int) -> list[str]:
    """The deterministic demo vocabulary of exactly ``size`` tokens (size >= 130)."""
    if size < len(HEAD) + len(string.ascii_lowercase):
        raise ConfigError(f"vocabulary size {size} is too small for the BERT layout")
    chars = list(string.punctuation) + list(string.digits) + list(string.ascii_lowercase)
    letters = string.ascii_lowercase
    bigrams = ["".join(p) for p in itertools.product(letters, repeat=2)]
    trigrams = ("".join(p) for p in itertools.product(letters, repeat=3))
    body = itertools.chain(
        chars,
        ("##" + c for c in string.digits + letters),
        COMMON_WORDS,
        bigrams,
        ("##" + b for b in bigrams),
        itertools.chain.from_iterable((t, "##" + t) for t in trigrams),
    )
    return bert_vocab(body, size)


def check_vocab(path: pathlib.Path, vocab_size: int,
                fix: str = "pass the model's own vocab.txt with --vocab") -> list[str]:
    """Assert the vocabulary matches the word embeddings row for row (``fix``: what the error
    tells the user to do).

    A mismatch means the vocabulary belongs to another model (or was cut short): token ids would
    index the wrong (or no) embedding rows, so it is an error, not a warning.
    """
    tokens = read_vocab(path, error=ModelFormatError)
    if len(tokens) != vocab_size:
        raise ModelFormatError(
            f"vocabulary {path} has {len(tokens)} tokens but bert/embeddings/word_embeddings "
            f"has {vocab_size} rows; {fix}"
        )
    for token in REQUIRED_TOKENS:
        if token not in tokens:
            raise ModelFormatError(f"vocabulary {path} lacks the special token {token}")
    warn_duplicates(path, tokens)
    return tokens


def warn_duplicates(path: pathlib.Path, tokens: list[str]) -> dict[str, list[int]]:
    """Log a warning naming the tokens ``tokens`` (a vocabulary, in id order) holds more than once, and
    return them (token -> its ids).

    A warning, not an error: google-research's ``load_vocab`` (which every BERT vocabulary was written
    for, and Hugging Face's copy of it) accepts such a file, the last line winning, and so does the
    tokenizer here; refusing would turn away a model its own tools run. But the earlier ids of a
    repeated token are then never produced, and a line overwritten by another token (a damaged file of
    the right size, which the size check cannot see) shows up as exactly such a repeat.
    """
    ids: dict[str, list[int]] = {}
    for index, token in enumerate(tokens):
        ids.setdefault(token, []).append(index)
    repeated = {token: at for token, at in ids.items() if len(at) > 1}
    if repeated:
        shown = "; ".join(f"{token!r} at ids {', '.join(map(str, at))}" for token, at in list(repeated.items())[:3])
        more = f" and {len(repeated) - 3} more" if len(repeated) > 3 else ""
        logging.getLogger(__name__).warning(
            "warning: vocabulary %s repeats %s (%s%s); as in google-research's load_vocab the last id "
            "wins and the earlier ones are never produced. A damaged file?", path,
            counted(len(repeated), "token"), shown, more)
    return repeated
