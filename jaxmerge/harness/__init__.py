"""jaxmerge and lm-evaluation-harness: jaxmerge as an lm-eval model (`backend`; importing this
package registers it as `jaxmerge`), lm-eval tasks as jaxmerge fitness (`tasks`). Needs the
`lm-eval` extra (`pip install "jaxmerge[lm-eval]"`)."""

from jaxmerge.harness.backend import JaxmergeLM

__all__ = ["JaxmergeLM"]
