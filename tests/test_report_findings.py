"""The report's result sentences come from the measured numbers: fed opposite outcomes, the
sentences say the opposite. Pure Python on made-up results (no training)."""

from dlassign import main_job
from dlassign.analysis import findings
from dlassign.analysis.convexity_report import eigenvalue_verdict, line_verdict, saturated_verdict
from dlassign.analysis.sharpness import edge_of_stability_findings, edge_of_stability_summary

ETA = 0.5  # 2/eta = 4


def sharpness_run(sharpness, train_loss, every=10, diverged_at=None):
    steps = list(range(0, every * len(sharpness), every))
    return {"loss": "mse", "eta": ETA, "steps": steps, "sharpness": list(sharpness),
            "train_loss": list(train_loss), "diverged_at": diverged_at,
            "trained": diverged_at is None and train_loss[-1] < train_loss[0],
            "lanczos_checks": [],
            "summary": edge_of_stability_summary(steps, sharpness, ETA, 0.1)}


def study(*runs):
    result = {"runs": list(runs), "reach_tolerance": 0.1, "eval_every": 10, "model":
              {"hidden_sizes": [32], "activation": "tanh"}, "num_examples": 100,
              "dataset": "digits", "num_params": 1000,
              "num_steps": 10 * (len(runs[0]["sharpness"]) - 1), "table": "| table |\n"}
    return dict(result, findings=edge_of_stability_findings(result))


def test_the_edge_of_stability_section_says_what_the_runs_measured():
    # rises to 2/eta at step 20, overshoots to 1.5x, falls back, ends below
    edge = study(sharpness_run([1.0, 2.0, 3.8, 6.0, 2.0, 3.9, 1.0], [1.0, 0.5, 0.8, 0.3, 0.2]))
    # never within 10% of 2/eta
    flat = study(sharpness_run([1.0, 1.2, 1.5, 1.6, 1.5, 1.4, 1.3], [1.0, 0.5, 0.4, 0.3, 0.2]))
    reached, never = (main_job.edge_of_stability_text(r) for r in (edge, flat))
    assert all(f"* {line}" in reached for line in edge["findings"])
    assert all(f"* {line}" in never for line in flat["findings"])
    assert "rises to it by step 20" in reached and "overshoots 2/eta" in reached
    assert "never comes within 10% of 2/eta" in never and "overshoots" not in never
    assert "rises to about 2/eta" not in reached + never


def test_spectrum_and_quadratic_model_sentences_follow_the_numbers():
    base = {"lanczos_max": 10.0, "top_eigenvalues": [10.0], "trace": 20.0, "num_params": 100}
    negative = findings.spectrum(dict(base, lanczos_min=-0.5))
    positive = findings.spectrum(dict(base, lanczos_min=0.01))
    assert negative.startswith("The loss is not convex here") and "5.00% of the largest" in negative
    assert positive.startswith("Lanczos finds no negative curvature") and "50 times" in positive
    holds = findings.quadratic_model({"ratios": [1.0, 0.99, 0.7], "steps": [0.01, 0.1, 1.0]})
    never = findings.quadratic_model({"ratios": [0.5, 0.7], "steps": [0.01, 0.1]})
    always = findings.quadratic_model({"ratios": [1.0, 1.01], "steps": [0.01, 0.1]})
    assert "holds (ratio within 5% of 1) at steps 0.01, 0.1, and not at 1" in holds
    assert never.startswith("The quadratic model holds at none")
    assert always.startswith("The quadratic model holds at every step")


def test_convexity_sentences_follow_the_measurements():
    """Cross-entropy measured convex and MSE not, then the opposite: the sentences swap."""
    as_expected = line_verdict({"cross_entropy": 0, "mse": 12})
    opposite = line_verdict({"cross_entropy": 3, "mse": 0})
    assert as_expected == ("Along a line through the origin, cross-entropy is convex (0 negative "
                           "second differences) and MSE is not convex (12 negative second "
                           "differences).")
    assert "cross-entropy is not convex (3" in opposite and "MSE is convex (0" in opposite
    convex = {"convex": True, "min_eigenvalue": -1e-18, "min_closed_form_eigenvalue": 0.0,
              "num_negative": 0, "num_points": 50}
    not_convex = dict(convex, convex=False, min_eigenvalue=-0.02, num_negative=7)
    assert "within round-off of 0" in eigenvalue_verdict(convex, "Cross-entropy")
    assert eigenvalue_verdict(not_convex, "Cross-entropy") == (
        "Cross-entropy's smallest eigenvalue, -0.02, is real negative curvature (7 of 50 points).")
    vanishes = {"cross_entropy": {"saturated": {"initial_grad_norm": 2.0}},
                "mse": {"saturated": {"initial_grad_norm": 1e-9}}}
    does_not = {"cross_entropy": {"saturated": {"initial_grad_norm": 2.0}},
                "mse": {"saturated": {"initial_grad_norm": 1.0}}}
    assert saturated_verdict(vanishes).startswith("there MSE's gradient norm is 1e-09")
    assert saturated_verdict(does_not).startswith("yet MSE's gradient norm there, 1, is not small")


def test_question4_says_what_its_runs_trained_on():
    import ml_collections

    def config(data, weights=""):
        run = lambda: {"data": {"name": data}, "torchvision_weights": weights}
        return ml_collections.ConfigDict({"transfer": {"lenet5": run(), "resnet18": run()}})

    stand_in = main_job.transfer_setting(config("digits32"))
    assert stand_in.startswith("**Not measured here:** SVHN") and "on digits32, both from " \
        "scratch" in stand_in
    svhn = main_job.transfer_setting(config("svhn", "IMAGENET1K_V1"))
    assert svhn == "LeNet-5 and ResNet-18 on SVHN, LeNet-5, ResNet-18 from pretrained weights.\n"
