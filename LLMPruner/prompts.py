"""The reference's sample prompts, generated from after pruning (``--test_after_train``)."""

REFERENCE_PROMPTS = [
    "I believe the meaning of life is",
    "Simply put, the theory of relativity states that ",
    "Building a website can be done in 10 simple steps:\n",
    "Tweet: \"I hate it when my phone battery dies.\"\nSentiment: Negative\n###\nTweet: \"My day has been "
    "\U0001F44D\"\nSentiment: Positive\n###\nTweet: \"This is the link to the article\"\nSentiment: Neutral\n"
    "###\nTweet: \"This new music video was incredibile\"\nSentiment:",
    "Translate English to French:\n\nsea otter => loutre de mer\n\npeppermint => menthe poivrée\n\n"
    "plush girafe => girafe peluche\n\ncheese =>",
]
