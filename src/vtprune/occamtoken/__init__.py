"""OccamToken's pieces apart from the method itself (``vtprune.methods.occamtoken``).

OccamToken (arXiv 2605.29657) keeps a visual token when its attention beats a *test-time register*
(Jiang et al., "Vision Transformers Don't Need Trained Registers", arXiv 2506.08010) scored in the
same softmax. One module per concern, each readable alone:

* :mod:`.scores`         the scoring and threshold functions (tensors in, tensors out);
* :mod:`.towers`         :class:`~.towers.RegisterTower`, the per-family vision-tower interface
                         (declared by each family as ``Family.register_tower``), ``first_param``,
                         ``redirect_activations`` and ``tower_identity``;
* :mod:`.neurons`        :class:`~.neurons.RegisterNeurons`, the register neurons of one tower (JSON);
* :mod:`.neuron_search`  finding them from ~100-500 images (``calibrate_register_neurons``);
* :mod:`.neuron_cache`   storing them per tower (``load_or_calibrate``, ``latest_calibration``);
* :mod:`.intervention`   ``test_time_register``: the register appended while the tower runs;
* :mod:`.diagnostics`    ``n_eff`` of the CLS attention without and with the register;
* :mod:`.budget`         fitting λ2 (or λ1) to a target mean kept count;
* :mod:`.tower_loading`  the vision tower of a local model directory;
* :mod:`.cli`            ``vtprune calibrate registers`` and ``vtprune calibrate budget``.

Supported towers: CLIP (``CLIPVisionModel`` of transformers 5, as inside LLaVA-1.5 / LLaVA-NeXT), and
the Qwen2.5-VL / Qwen3-VL vision towers, where the register is 4 copies (one 2×2 merge group) per image
threaded through the packed ``cu_seqlens`` / rotary / window-index / merger logic (see
:class:`vtprune.models.qwen2_5_vl.QwenTower`).
"""
