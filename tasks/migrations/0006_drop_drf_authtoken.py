"""API tokens moved from DRF's authtoken (keys stored in plain text) to django-rest-knox
(SHA-512 digests). The old keys are dropped, not converted: a digest cannot be made without
the key, and a key kept in plain text is what this removes. Re-issue tokens with
`manage.py api_token create NAME` (see docs/deployment.md, "API tokens")."""

from django.db import migrations


def forget_authtoken(apps, schema_editor):
    # Its permissions and content type, and its migration records: if the app were ever
    # installed again, migrate would create its table anew instead of assuming it exists.
    content_type = apps.get_model("contenttypes", "ContentType")
    content_type.objects.filter(app_label="authtoken").delete()
    schema_editor.execute("DELETE FROM django_migrations WHERE app = 'authtoken'")


class Migration(migrations.Migration):
    dependencies = [
        ("tasks", "0005_scheduler_system"),
        ("contenttypes", "0002_remove_content_type_name"),
        ("auth", "0012_alter_user_first_name_max_length"),
    ]

    operations = [
        migrations.RunSQL("DROP TABLE IF EXISTS authtoken_token", migrations.RunSQL.noop),
        migrations.RunPython(forget_authtoken, migrations.RunPython.noop),
    ]
