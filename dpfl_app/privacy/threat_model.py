"""Who sees what, in each mode: the "Threat model" section of privacy.md.

Plain text, no Flower imports. docs/secure-aggregation.md says
the same at more length.
"""

from __future__ import annotations

CENTRAL = [
    "- **Mode: central DP (secure-aggregation=false).** The server operator sees every sampled "
    "client's clipped update and its clipping bit, in the clear. ε does not protect clients "
    "from the server: it is trusted to add the noise and to keep the individual updates to "
    "itself (they are never logged or saved).",
    "- Everyone else (model users, other clients, anyone reading the outputs) sees only the "
    "noised releases: the global models and the noised clipped-count. ε covers exactly these.",
]

SECURE = [
    "- **Mode: secure aggregation with central DP (secure-aggregation=true).** SecAgg+ "
    "(Bell et al. 2020) masks each client's quantized clipped update and clipping bit. The "
    "server learns the *sum* over the clients that survive the round, un-noised, and no single "
    "update: with clients dropping out at any stage, no client's update or bit is revealed on "
    "its own (a client never hands over both kinds of share of another, and each "
    "neighbourhood's threshold is a majority). A round with fewer survivors than the clients' "
    "floors releases noise only. The server still sees the un-noised sum of the cohort, so ε "
    "does not protect the cohort's *aggregate* from the server; distributed noise (each client "
    "adding a share of discrete noise) would remove that.",
    "- **Against a server that lies** (shows clients different survivor sets, substitutes "
    "public keys, sends tiny neighbourhoods or repeated requests): each client signs its round "
    "keys and the survivor set it is shown with a long-term identity key, checks its "
    "neighbours' signatures before it uses their keys or sends any share, and enforces floors "
    "on its neighbourhood, threshold and survivors, one setup and one unmasking per round "
    "(Bonawitz et al. 2017, actively secure variant). This holds only when the clients verify "
    "each other's identity keys against a list pinned by the federation's members "
    "(node-config secagg-pinned-keys); with keys relayed by the server (simulation's default) "
    "it holds against an honest-but-curious server only.",
    "- **What a client learns** in this mode: its neighbours' indices, the exact size of its "
    "neighbourhood (with the complete graph, the exact cohort size) and the survivor set of "
    "the round, i.e. who dropped out. These are exact participation counts that reach every "
    "sampled client; they are not covered by ε.",
    "- Everyone else sees only the noised releases, covered by ε: the noise and the fixed "
    "denominator m are those of the central mode, but a withheld sum is a release too (adding "
    "one client can turn \"noise only\" into a sum of several), so each round is accounted "
    "with the sensitivity of the largest sum that can be withheld (\"Withheld sums\" below).",
    "- Masking also hides a malicious client's input from the server's reply screening: a "
    "client that skips clipping or sends out-of-range values cannot be caught or re-clipped. "
    "That cannot hurt the privacy of honest clients (their updates stay hidden and the noise "
    "is unchanged), but it can bias or break the model, and it breaks the sensitivity bound "
    "for the misbehaving client's own contribution. Integrity needs verifiable aggregation, "
    "such as the Prio zero-knowledge range proofs used by dpsa4flower.",
]


CLIENT_NOISE = [
    "- **Mode: distributed DP (noise-at=clients, with secure aggregation).** Each client adds "
    "its own share of discrete (Skellam) noise to its integer-encoded update before masking, "
    "modulo 2^b. The server unmasks only the noised sum and adds no noise itself: nothing it "
    "holds is an un-noised aggregate. ε protects clients from the server too, as long as at "
    "least the threshold t of the survivors of each sum are honest (each client refuses to "
    "unmask a sum of fewer than t). Not covered: collusion of the server with clients that "
    "withhold their shares (c colluders leave t - c shares), and integrity: a malicious "
    "client can send any residue, which the masks hide (dpsa4flower stops that with Prio's "
    "zero-knowledge range proofs).",
]


def threat_model(secure_aggregation: bool) -> list[str]:
    """Markdown lines: who sees what in the mode the run used."""
    return ["## Threat model: who sees what", "",
            *(SECURE if secure_aggregation else CENTRAL), ""]
