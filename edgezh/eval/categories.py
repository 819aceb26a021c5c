"""Subject → category tables of C-Eval and CMMLU.

Facts taken from the official repositories (our own table, not a copy of their files):

- C-Eval: `subject_mapping.json` of hkust-nlp/ceval (SJTU-LIT/ceval): each subject's Chinese name
  and category (STEM, Social Science, Humanities, Other). That file gives `clinical_medicine` no
  category; the C-Eval paper lists Clinical Medicine under Other, which is used here. C-Eval Hard is
  the eight subjects named in the repository's README (advanced mathematics, discrete mathematics,
  probability and statistics, college chemistry, college physics, high school mathematics, high
  school chemistry, high school physics).
- CMMLU: `src/categories.py` of haonan-li/CMMLU: each subject's Chinese name and subcategories, and
  which subcategories make up STEM, Humanities, Social Science, Other and China specific. A subject
  counts in the category of each of its subcategories (so a China-specific subject is in two).

Category figures are the mean of the subject accuracies in the category, and the overall figure the
mean over subjects, as CMMLU's `get_results` computes them.
"""

from __future__ import annotations

STEM, SOCIAL, HUMANITIES, OTHER = "STEM", "Social Science", "Humanities", "Other"
CATEGORIES = (STEM, SOCIAL, HUMANITIES, OTHER)

# subject: (Chinese name, category)
CEVAL: dict[str, tuple[str, str]] = {
    "computer_network": ("计算机网络", STEM),
    "operating_system": ("操作系统", STEM),
    "computer_architecture": ("计算机组成", STEM),
    "college_programming": ("大学编程", STEM),
    "college_physics": ("大学物理", STEM),
    "college_chemistry": ("大学化学", STEM),
    "advanced_mathematics": ("高等数学", STEM),
    "probability_and_statistics": ("概率统计", STEM),
    "discrete_mathematics": ("离散数学", STEM),
    "electrical_engineer": ("注册电气工程师", STEM),
    "metrology_engineer": ("注册计量师", STEM),
    "high_school_mathematics": ("高中数学", STEM),
    "high_school_physics": ("高中物理", STEM),
    "high_school_chemistry": ("高中化学", STEM),
    "high_school_biology": ("高中生物", STEM),
    "middle_school_mathematics": ("初中数学", STEM),
    "middle_school_biology": ("初中生物", STEM),
    "middle_school_physics": ("初中物理", STEM),
    "middle_school_chemistry": ("初中化学", STEM),
    "veterinary_medicine": ("兽医学", STEM),
    "college_economics": ("大学经济学", SOCIAL),
    "business_administration": ("工商管理", SOCIAL),
    "marxism": ("马克思主义基本原理", SOCIAL),
    "mao_zedong_thought": ("毛泽东思想和中国特色社会主义理论体系概论", SOCIAL),
    "education_science": ("教育学", SOCIAL),
    "teacher_qualification": ("教师资格", SOCIAL),
    "high_school_politics": ("高中政治", SOCIAL),
    "high_school_geography": ("高中地理", SOCIAL),
    "middle_school_politics": ("初中政治", SOCIAL),
    "middle_school_geography": ("初中地理", SOCIAL),
    "modern_chinese_history": ("近代史纲要", HUMANITIES),
    "ideological_and_moral_cultivation": ("思想道德修养与法律基础", HUMANITIES),
    "logic": ("逻辑学", HUMANITIES),
    "law": ("法学", HUMANITIES),
    "chinese_language_and_literature": ("中国语言文学", HUMANITIES),
    "art_studies": ("艺术学", HUMANITIES),
    "professional_tour_guide": ("导游资格", HUMANITIES),
    "legal_professional": ("法律职业资格", HUMANITIES),
    "high_school_chinese": ("高中语文", HUMANITIES),
    "high_school_history": ("高中历史", HUMANITIES),
    "middle_school_history": ("初中历史", HUMANITIES),
    "civil_servant": ("公务员", OTHER),
    "sports_science": ("体育学", OTHER),
    "plant_protection": ("植物保护", OTHER),
    "basic_medicine": ("基础医学", OTHER),
    "clinical_medicine": ("临床医学", OTHER),
    "urban_and_rural_planner": ("注册城乡规划师", OTHER),
    "accountant": ("注册会计师", OTHER),
    "fire_engineer": ("注册消防工程师", OTHER),
    "environmental_impact_assessment_engineer": ("环境影响评价工程师", OTHER),
    "tax_accountant": ("税务师", OTHER),
    "physician": ("医师资格", OTHER),
}

CEVAL_HARD = frozenset({
    "advanced_mathematics", "discrete_mathematics", "probability_and_statistics", "college_chemistry",
    "college_physics", "high_school_mathematics", "high_school_chemistry", "high_school_physics",
})

CHINA_SPECIFIC = "China specific"
_CMMLU_GROUPS: dict[str, tuple[str, ...]] = {
    STEM: ("physics", "chemistry", "biology", "computer science", "math", "engineering", "statistics"),
    HUMANITIES: ("history", "philosophy", "law", "arts", "literature", "global"),
    SOCIAL: ("linguistics", "business", "politics", "culture", "economics", "geography", "psychology", "education", "sociology"),
    OTHER: ("other",),
    CHINA_SPECIFIC: ("china specific",),
}
CMMLU_GROUP_OF = {sub: group for group, subs in _CMMLU_GROUPS.items() for sub in subs}

# subject: (Chinese name, subcategories)
CMMLU: dict[str, tuple[str, tuple[str, ...]]] = {
    "agronomy": ("农学", ("other",)),
    "anatomy": ("解剖学", ("biology",)),
    "ancient_chinese": ("古汉语", ("linguistics", "china specific")),
    "arts": ("艺术学", ("arts",)),
    "astronomy": ("天文学", ("physics",)),
    "business_ethics": ("商业伦理", ("business",)),
    "chinese_civil_service_exam": ("中国公务员考试", ("politics", "china specific")),
    "chinese_driving_rule": ("中国驾驶规则", ("other", "china specific")),
    "chinese_food_culture": ("中国饮食文化", ("culture", "china specific")),
    "chinese_foreign_policy": ("中国外交政策", ("politics", "china specific")),
    "chinese_history": ("中国历史", ("history", "china specific")),
    "chinese_literature": ("中国文学", ("literature", "china specific")),
    "chinese_teacher_qualification": ("中国教师资格", ("education", "china specific")),
    "clinical_knowledge": ("临床知识", ("other",)),
    "college_actuarial_science": ("大学精算学", ("math",)),
    "college_education": ("大学教育学", ("education",)),
    "college_engineering_hydrology": ("大学工程水文学", ("engineering",)),
    "college_law": ("大学法律", ("law",)),
    "college_mathematics": ("大学数学", ("math",)),
    "college_medical_statistics": ("大学医学统计", ("statistics",)),
    "college_medicine": ("大学医学", ("other",)),
    "computer_science": ("计算机科学", ("computer science",)),
    "computer_security": ("计算机安全", ("other",)),
    "conceptual_physics": ("概念物理学", ("physics",)),
    "construction_project_management": ("建设工程管理", ("other", "china specific")),
    "economics": ("经济学", ("economics",)),
    "education": ("教育学", ("education",)),
    "electrical_engineering": ("电气工程", ("engineering",)),
    "elementary_chinese": ("小学语文", ("linguistics", "china specific")),
    "elementary_commonsense": ("小学常识", ("other", "china specific")),
    "elementary_information_and_technology": ("小学信息技术", ("other",)),
    "elementary_mathematics": ("初等数学", ("math",)),
    "ethnology": ("民族学", ("culture", "china specific")),
    "food_science": ("食品科学", ("other",)),
    "genetics": ("遗传学", ("biology",)),
    "global_facts": ("全球事实", ("global",)),
    "high_school_biology": ("高中生物", ("biology",)),
    "high_school_chemistry": ("高中化学", ("chemistry",)),
    "high_school_geography": ("高中地理", ("geography",)),
    "high_school_mathematics": ("高中数学", ("math",)),
    "high_school_physics": ("高中物理学", ("physics",)),
    "high_school_politics": ("高中政治", ("politics", "china specific")),
    "human_sexuality": ("人类性行为", ("other",)),
    "international_law": ("国际法学", ("law",)),
    "journalism": ("新闻学", ("sociology",)),
    "jurisprudence": ("法理学", ("law",)),
    "legal_and_moral_basis": ("法律与道德基础", ("other",)),
    "logical": ("逻辑学", ("philosophy",)),
    "machine_learning": ("机器学习", ("computer science",)),
    "management": ("管理学", ("business",)),
    "marketing": ("市场营销", ("business",)),
    "marxist_theory": ("马克思主义理论", ("philosophy",)),
    "modern_chinese": ("现代汉语", ("linguistics", "china specific")),
    "nutrition": ("营养学", ("other",)),
    "philosophy": ("哲学", ("philosophy",)),
    "professional_accounting": ("专业会计", ("business",)),
    "professional_law": ("专业法学", ("law",)),
    "professional_medicine": ("专业医学", ("other",)),
    "professional_psychology": ("专业心理学", ("psychology",)),
    "public_relations": ("公共关系", ("politics",)),
    "security_study": ("安全研究", ("politics",)),
    "sociology": ("社会学", ("culture",)),
    "sports_science": ("体育学", ("other",)),
    "traditional_chinese_medicine": ("中医中药", ("other", "china specific")),
    "virology": ("病毒学", ("biology",)),
    "world_history": ("世界历史", ("history",)),
    "world_religions": ("世界宗教", ("global",)),
}


def ceval_groups(subject: str) -> tuple[str, ...]:
    """The report groups a C-Eval subject counts in: its category, and "Hard" for C-Eval Hard."""
    if subject not in CEVAL:
        return ()
    return (CEVAL[subject][1],) + (("Hard",) if subject in CEVAL_HARD else ())


def cmmlu_groups(subject: str) -> tuple[str, ...]:
    """The report groups a CMMLU subject counts in (one per subcategory, in table order)."""
    if subject not in CMMLU:
        return ()
    groups: list[str] = []
    for sub in CMMLU[subject][1]:
        group = CMMLU_GROUP_OF[sub]
        if group not in groups:
            groups.append(group)
    return tuple(groups)


def zh_name(layout: str, subject: str) -> str:
    """The subject's Chinese name (for the prompt), or its handle with spaces when unknown."""
    table = CEVAL if layout == "ceval" else CMMLU
    return table[subject][0] if subject in table else subject.replace("_", " ")
