"""AlignIT: customized concepts that keep the rest of the prompt (Agarwal et al., arXiv 2406.18893).

The core has no WebUI import; hosts live in ``alignit.hosts``.
"""

__version__ = "0.1.0"
