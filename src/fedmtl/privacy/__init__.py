"""Privacy accounting (``accountant``: dp-accounting's RDP and PLD accountants). The privacy
feature itself (client-level DP-FedAvg, sample-level DP-SGD, the budget) is
``fedmtl.features.privacy``; see docs/privacy.md."""
