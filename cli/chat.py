"""The terminal side of `deco-gguf chat`: the turn loop (one prompt, piped lines or a terminal with /commands)
and the /stats table. The conversation itself is deco_gguf.runtime.chat.ChatSession."""

from __future__ import annotations

import contextlib
from collections.abc import Callable

from rich.table import Table

from ..runtime.activity import mean_rate
from ..runtime.chat import ChatSession, ReplyStats
from ..support.errors import DecoError

HELP = """commands:
  /reset   forget the conversation (the system prompt stays)
  /stats   last reply: tokens, tokens/s, context, expert activation, speculation
  /help    this list
  /exit    quit (also /quit, Ctrl-D); Ctrl-C stops a reply or drops a line"""


def stats_table(stats: ReplyStats | None):
    """The `/stats` table."""
    table = Table(title="last reply", show_header=False, title_justify="left")
    if stats is None:
        table.add_row("no reply yet", "")
        return table

    def tps(v: float | None) -> str:
        return f"{v:,.1f} tokens/s" if v is not None else "-"

    evaluated = f"{stats.prompt_evaluated} evaluated (rest cached)"
    table.add_row("prompt", f"{stats.prompt_tokens} tokens, {evaluated}: {tps(stats.prompt_tps)}")
    table.add_row("reply", f"{stats.generated_tokens} tokens ({stats.finish_reason}): {tps(stats.decode_tps)} decode")
    ttft = f"{stats.first_token_seconds * 1e3:,.1f} ms" if stats.first_token_seconds is not None else "-"
    table.add_row("time to first token", ttft)
    table.add_row("wall time", f"{stats.wall_seconds:.2f} s")
    if (spec := stats.speculative) is not None:
        if spec.n_drafted:
            acceptance = f"{spec.acceptance:.0%} ({spec.n_accepted}/{spec.n_drafted} drafted)"
        else:
            acceptance = "nothing drafted"
        verifications = f"{spec.n_verify} verifications, {spec.tokens_per_verify:.2f} tokens each"
        table.add_row("speculation", f"{verifications}; acceptance {acceptance}")
    dropped = f", {stats.trimmed_turns} oldest turn(s) dropped" if stats.trimmed_turns else ""
    table.add_row("context", f"{stats.context_used} / {stats.n_ctx} tokens{dropped}")
    for label, rates in (("activation (prompt)", stats.prompt_activity), ("activation (reply)", stats.reply_activity)):
        mean = mean_rate(rates)
        most = max((r.tokens for r in rates), default=0)
        # llama.cpp runs the last layer only on positions whose logits are needed: say how few
        layers = ", ".join(
            f"L{r.layer} {r.rate:.1%}" + (f" of {r.tokens} token(s)" if r.tokens < most else "")
            for r in rates
            if r.tokens
        )
        table.add_row(label, f"mean {mean:.1%} ({layers})" if mean is not None else "-")
    return table


def _stream(session: ChatSession, user: str, write: Callable[[str], None]) -> None:
    gen = session.reply(user)
    try:
        for piece in gen:
            write(piece)
    finally:
        gen.close()


def run_chat(
    session: ChatSession, out, err, *, prompt: str | None = None, interactive: bool = False, lines=None
) -> int:
    """Drive `session`: one `prompt`, or the `lines` of a pipe (each a user turn), or a terminal.

    `out` and `err` are rich Consoles: replies stream raw to `out`, everything else is rich. A turn
    that fails (a message longer than the context) is reported and the session goes on, piped or
    interactive; returns how many turns failed.
    """
    loop = _ChatLoop(session, out, err)
    if prompt is not None:
        loop.turn(prompt)
        return 0
    return loop.terminal() if interactive else loop.piped(lines)


class _ChatLoop:
    def __init__(self, session: ChatSession, out, err):
        self.session, self.out, self.err = session, out, err
        self.failed = 0

    def write(self, text: str) -> None:
        self.out.file.write(text)
        self.out.file.flush()

    def notice(self, message: str) -> None:
        self.err.print(f"[dim]{message}[/]", highlight=False, soft_wrap=True)

    def report(self, error: DecoError) -> None:
        self.err.print(f"[bold red]error:[/] {error}", highlight=False, soft_wrap=True)
        self.failed += 1

    def turn(self, user: str) -> None:
        try:
            _stream(self.session, user, self.write)
        finally:
            self.write("\n")
            last = self.session.last
            if last is not None and last.trimmed_turns:
                self.notice(f"(context full: dropped the {last.trimmed_turns} oldest turn(s))")

    def command(self, line: str) -> bool:
        """Run a /command; False when it asks to quit."""
        name = line.split()[0].lower()
        if name in ("/exit", "/quit"):
            return False
        if name == "/reset":
            self.session.reset()
            self.notice("(history cleared)")
        elif name == "/stats":
            self.out.print(stats_table(self.session.last))
        elif name in ("/help", "/?"):
            self.out.print(HELP, highlight=False, markup=False)
        else:
            self.err.print(f"[yellow]unknown command {name}[/] (try /help)", highlight=False)
        return True

    def handle(self, line: str) -> bool:
        """One input line: a command or a user turn. False once the session should end."""
        if not line.strip():
            return True
        if line.startswith("/"):
            return self.command(line)
        self.turn(line)
        return True

    def piped(self, lines) -> int:
        for raw in lines:
            try:
                if not self.handle(raw.rstrip("\r\n")):
                    break
            except DecoError as e:  # its reply line stays empty, so replies keep matching input lines
                self.report(e)
        return self.failed

    def terminal(self) -> int:
        with contextlib.suppress(ImportError):
            import readline  # noqa: F401  (line editing and history for input())
        color = self.out.is_terminal and not self.out.no_color
        ps = "\001\033[1;32m\002> \001\033[0m\002" if color else "> "
        self.notice("type a message; /help for commands, /exit or Ctrl-D to quit, Ctrl-C stops a reply")
        while True:
            try:
                line = input(ps)
            except EOFError:
                self.write("\n")
                return self.failed
            except KeyboardInterrupt:  # as in Python's REPL: drop the line, stay
                self.write("\n")
                self.notice("(Ctrl-D or /exit quits)")
                continue
            try:
                if not self.handle(line):
                    return self.failed
            except KeyboardInterrupt:
                self.notice("(reply stopped)")
            except DecoError as e:
                self.report(e)
