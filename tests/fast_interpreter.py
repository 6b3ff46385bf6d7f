"""Triton's interpreter, minus a cost that is not the kernels': it re-patches triton.language on every
call of a @triton.jit helper inside a kernel (`InterpretedFunction.__call__` calls `_patch_lang`), although
the launch patched it already. Profiled, that is 45% of an interpreted OnTIES step (inspect.getmembers over
the language per helper call). The re-patch is redundant: builtins the launch wrapped are no longer builtins
(so are skipped), and the rest is set to the same functions again; the launch's own restore puts every
original back either way. A helper whose globals hold a language module the launch did not patch (the
standard library's `tl.zeros` sees `triton.language.core`) is still patched, once per launch.

Tests only (conftest, and the processes tests/distributed.py spawns). Triton 3.6 to 3.9 have these
internals; on a triton without them nothing is changed and the interpreter is merely slower.
tests/test_fast_interpreter.py checks the results are bit-identical with and without it.
"""

from __future__ import annotations


def patch_language_once_per_launch() -> bool:
    """Installs the once-per-launch patching; True when it is in place."""
    try:
        import triton.language as tl
        from triton.runtime import interpreter

        original = interpreter._patch_lang
        empty_scope = interpreter._LangPatchScope
    except (ImportError, AttributeError):
        return False
    if hasattr(original, "unpatched"):
        return True
    patched: set[int] | None = None  # ids of the language modules patched by the launch running, if any

    def patch_lang(fn):
        nonlocal patched
        langs = {id(value) for value in fn.__globals__.values() if value is tl or value is tl.core}
        if patched is not None and langs <= patched:
            return empty_scope()  # a helper inside the launch: nothing left to patch
        scope = original(fn)
        if patched is not None:  # a helper seeing another language module: triton never restores its scope
            patched |= langs
            return scope
        patched = langs  # the launch (GridExecutor), which restores its scope when the grid has run
        restore = scope.restore

        def restore_and_end_launch():
            nonlocal patched
            patched = None
            restore()

        scope.restore = restore_and_end_launch
        return scope

    patch_lang.unpatched = original
    interpreter._patch_lang = patch_lang
    return True


def unpatch() -> None:
    """Puts triton's own `_patch_lang` back (for the test comparing the two)."""
    from triton.runtime import interpreter

    interpreter._patch_lang = getattr(interpreter._patch_lang, "unpatched", interpreter._patch_lang)
