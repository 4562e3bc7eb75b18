"""The one error type users see: its message is a single line saying what is wrong and what to do."""


class CpOnnxError(Exception):
    """A problem with the user's input or environment; the CLI prints it and exits with code 2."""


MESSAGE_CHARS = 2000  # an error message past this is cut in its middle: its start says what, its end what to do


def one_line(message: str) -> str:
    """``message`` as one printable line: characters that break lines or drive a terminal (a file's contents quoted in a
    message: U+2028, escape sequences, NUL) shown escaped, and a message longer than MESSAGE_CHARS cut in its middle."""
    text = "".join(ch if ch.isprintable() else repr(ch)[1:-1] for ch in message)
    if len(text) > MESSAGE_CHARS:
        text = f"{text[: MESSAGE_CHARS * 3 // 4]} ... {text[-MESSAGE_CHARS // 4 :]}"
    return text
