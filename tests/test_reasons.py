"""Why parallel is what it is, said once where the user chose it (not "why parallel=4: parallel=4 as asked")."""

from __future__ import annotations

from types import SimpleNamespace

from nbollama._core._config import AS_ASKED, choose_parallel
from nbollama.widgets._dashboard import _why


def test_a_parallel_the_user_chose_is_said_once() -> None:
    model = SimpleNamespace(is_recurrent=False, is_hybrid=False)
    parallel, reason = choose_parallel(model, 4, 256, 512)  # type: ignore[arg-type]
    assert (parallel, reason) == (4, AS_ASKED)
    assert _why(4, reason) == "parallel=4, as asked"


def test_a_rule_s_reason_is_given_with_its_question() -> None:
    said = _why(4, "auto: 4 slots need 168 MiB, available RAM is 22 GiB")
    assert said == "why parallel=4: auto: 4 slots need 168 MiB, available RAM is 22 GiB"
    assert _why(2, "a <b>") == "why parallel=2: a &lt;b&gt;"  # escaped: it lands in HTML
